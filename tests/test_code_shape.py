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
