"""The package's shape rules: no function longer than 50 lines, no call with more than 6 positional arguments.

Long functions and long positional argument lists are where this project's bugs hid (a 15-argument loop, a
7-tuple passed around); the rule keeps every function readable on one screen and every call self-describing.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcnseg"
MAX_LINES = 50
MAX_POSITIONAL = 6


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` (decorators excluded) to the last line of the body, docstring included."""
    return node.end_lineno - node.lineno + 1


def _offenders() -> tuple[list[str], list[str]]:
    long, calls = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(PACKAGE.parent)
        for fn in _functions(tree):
            if _length(fn) > MAX_LINES:
                long.append(f"{where}:{fn.lineno} {fn.name} ({_length(fn)} lines)")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL:
                calls.append(f"{where}:{node.lineno} {ast.unparse(node.func)}(... {len(node.args)} positional)")
    return long, calls


def test_no_function_is_longer_than_50_lines():
    long, _ = _offenders()
    assert long == [], "\n".join(long)


def test_no_call_passes_more_than_6_positional_arguments():
    _, calls = _offenders()
    assert calls == [], "\n".join(calls)


def test_the_rules_see_a_long_function_and_a_long_call(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    tree = ast.parse(f"def f():\n{body}\n    g(1, 2, 3, 4, 5, 6, 7)\n")
    fn = next(_functions(tree))
    assert _length(fn) == MAX_LINES + 2
    assert [len(n.args) for n in ast.walk(tree) if isinstance(n, ast.Call)] == [7]


# ------------------------------------------------------------------------------ one way into the model's forward

# Where a model's forward may be called: the inference object and the execution paths it holds, training, the
# models themselves (a network calls its parts) and the export's tracers. Everywhere else a consumer goes through
# fcnseg.inference.Predictor, so that tiling, test-time augmentation, the runtime and multi-head splitting are the
# same for every consumer.
FORWARD_ALLOWED = ("inference.py", "runtime/", "engine/train.py", "models/")
MODEL_NAMES = {"model", "net", "network", "fcn", "stream", "compiled", "traced"}


def _forward_calls(tree: ast.AST) -> list[int]:
    """Lines that call a model: ``model(x)``, ``self.model(x)``, ``x.model(y)``, or ``<anything>.forward(x)``."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in MODEL_NAMES or (name == "forward" and isinstance(f, ast.Attribute)):
            lines.append(node.lineno)
    return lines


def test_only_the_inference_object_calls_a_models_forward():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith(FORWARD_ALLOWED):
            continue
        for line in _forward_calls(ast.parse(path.read_text(), filename=str(path))):
            offenders.append(f"fcnseg/{where}:{line}")
    assert offenders == [], "call the model through fcnseg.inference.Predictor:\n" + "\n".join(offenders)


def test_the_forward_rule_sees_each_way_of_calling_a_model():
    snippet = "model(x)\nself.model(x)\nnet.forward(x)\nf(model)\nmodel.eval()\n"
    assert _forward_calls(ast.parse(snippet)) == [1, 2, 3]
