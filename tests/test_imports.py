"""Layering: no module of the package imports its importer, and every module can be imported first.

The main check is static. Every ``import`` statement of every module is an edge of the package's import graph,
those inside functions too (they run sooner or later, and a cycle hidden in a function is still a cycle), and so
is the package that Python runs before a module it imports (``from ..data.nyud import X`` runs
``fcnseg/data/__init__.py`` first). The graph must have no cycle; a cycle is printed as a chain of modules, each
with the line that imports the next. Since it has none, the modules can be imported in any order; the second check
imports each one first, in an interpreter of its own, and each must import.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import fcnseg
from tests.helpers import HANG_TIMEOUT

PACKAGE = Path(fcnseg.__file__).resolve().parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

Graph = dict[str, dict[str, int]]


def _parents(name: str) -> list[str]:
    """The packages above module ``name``, outermost first: fcnseg.data.nyud -> [fcnseg, fcnseg.data]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _runs(name: str, importer: str) -> list[str]:
    """The package modules that importing ``name`` from ``importer`` may run: the deepest module of ``name``
    that exists and the packages above it, less those above ``importer`` (already running when it runs)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    if not name:
        return []
    running = set(_parents(importer)) | {importer}
    return [m for m in [*_parents(name), name] if m not in running]


def _imported_names(node: ast.AST, package: str) -> list[str]:
    """The absolute names an import statement imports (relative ones resolved against ``package``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{anchor}.{base}" if base else anchor
    # ``from pkg import name`` runs pkg, and pkg.name too when that is a module.
    return [base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)]


def _imports(module: str) -> list[tuple[str, int]]:
    """(package module, line) for every package module that ``module``'s import statements run, wherever they are."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        for name in _imported_names(node, package):
            edges += [(target, node.lineno) for target in _runs(name, module)]
    return edges


def import_graph() -> Graph:
    """Module -> {module it imports: line of the first statement that does}."""
    graph: Graph = {}
    for module in MODULES:
        edges = graph.setdefault(module, {})
        for target, line in sorted(_imports(module), key=lambda e: e[1]):
            edges.setdefault(target, line)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    on_path: dict[str, int] = {}  # node -> its index in path
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        on_path[node] = len(path)
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return [*path[on_path[nxt] :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        del on_path[path.pop()]
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def describe_cycle(cycle: list[str], graph: Graph) -> str:
    steps = [f"  {a} imports {b} ({MODULES[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return "import cycle:\n" + "\n".join(steps)


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert len(graph) == len(MODULES) > 30
    assert "fcnseg.data.base" in graph["fcnseg.data.voc"]  # from .base import ...
    assert "fcnseg.data.nyud" in graph["fcnseg.data"]  # from . import nyud
    assert "fcnseg.palette" in graph["fcnseg.data.voc"]  # from ..palette import ...
    assert "fcnseg.hub" in graph["fcnseg.cli.predict"]  # inside a function
    # A module of another package runs that package first; a module's own packages are running already.
    assert "fcnseg.data" in graph["fcnseg.engine.train"] and "fcnseg.models" in graph["fcnseg.hub"]
    assert "fcnseg.data" not in graph["fcnseg.data.voc"] and "fcnseg" not in graph["fcnseg.checkpoint"]


def test_find_cycle_reports_one():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"c": 2}, "c": {}}) is None


def test_layers():
    graph = import_graph()
    # Leaves: the datasets' class names and means, the errors.
    assert graph["fcnseg._meta"] == {} and graph["fcnseg.errors"] == {}
    # The checkpoint format knows nothing of models or data; rebuilding models from checkpoints is hub's.
    assert not [m for m in graph["fcnseg.checkpoint"] if m.startswith(("fcnseg.models", "fcnseg.data"))]
    # Models and data read the datasets' constants from _meta, not from each other.
    for a, b in [("models", "data"), ("data", "models")]:
        wrong = {m: t for m in graph if m.startswith(f"fcnseg.{a}") for t in graph[m] if t.startswith(f"fcnseg.{b}")}
        assert not wrong, f"{a} imports {b}: {wrong}"
    # Nothing below hub imports it.
    assert not [m for m in graph if "fcnseg.hub" in graph[m] and m.startswith(("fcnseg.models", "fcnseg.data"))]


def test_the_dataset_registry_fills_on_import_without_torchvision():
    # Every CLI command's parser lists the datasets; torchvision (2 s to import: it loads torch._dynamo) waits for
    # the first dataset item or torchvision backbone, so that `fcnseg predict` and `serve` start without it.
    code = (
        "import sys, fcnseg.data; from fcnseg.cli import build_parser; build_parser(); "
        "print(','.join(fcnseg.data.list_datasets()), 'torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env())
    names = "ade20k,cityscapes,coco,cvat,folder,labelme,nyud,sbd,seg11valid,siftflow,synthetic,voc"
    assert out.stdout.split() == [names, "False"], out.stderr


# A fresh interpreter imports the third-party libraries once, then forks one child per package module; each child
# starts with no fcnseg module loaded and imports its module first. (A subprocess per module would pay torch's
# import 40 times over.)
_EACH_FIRST = r"""
import importlib, json, os, sys, traceback

for lib in ("numpy", "PIL.Image", "torch", "torchvision"):
    importlib.import_module(lib)
assert not [m for m in sys.modules if m.split(".")[0] == "fcnseg"]
failures = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            report = b""
        except BaseException:
            report = traceback.format_exc().encode()
        with os.fdopen(w, "wb") as f:
            f.write(report)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if report or status:
        failures[name] = report or f"exit status {status}"
print(json.dumps(failures))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _each_first_without_fork(modules: list[str]) -> dict[str, str]:
    failures = {}
    for name in modules:
        code = "import importlib, sys; importlib.import_module(sys.argv[1])"
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, cwd=ROOT, env=_env())
        if out.returncode:
            failures[name] = out.stderr
    return failures


def test_each_module_imports_first_in_a_fresh_interpreter():
    modules = sorted(MODULES)
    if hasattr(os, "fork"):
        out = subprocess.run(
            [sys.executable, "-c", _EACH_FIRST, json.dumps(modules)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
            timeout=HANG_TIMEOUT,
        )
        assert out.returncode == 0, out.stderr
        failures = json.loads(out.stdout.splitlines()[-1])
    else:
        failures = _each_first_without_fork(modules)
    assert not failures, "\n".join(f"import {m} first fails:\n{tb}" for m, tb in failures.items())
    # This very interpreter imports them all too, in the sorted order.
    for name in modules:
        importlib.import_module(name)
