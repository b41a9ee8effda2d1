"""Every module imports alone, and module-level imports inside mnemo_fast form no cycle.

Fresh imports: one subprocess imports the third-party libraries once, then forks one child per
module; each child starts with no ``mnemo_fast`` module loaded and imports only its module, so
a module that works only when another one happened to be imported first fails here.

Cycles: a static graph of the imports that run when a module is loaded (``ast``; imports
inside functions and under ``if TYPE_CHECKING`` are left out). Importing ``a.b.c`` first runs
the packages ``a.b`` and ``a``, so those count as edges too, except the importer's own parent
packages (already running by then).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import mnemo_fast

PACKAGE = "mnemo_fast"
ROOT = Path(mnemo_fast.__file__).resolve().parent

#: No cycle and no module that fails to import first is tolerated.
KNOWN_CYCLES: list[set[str]] = []
KNOWN_ALONE_FAILURES: set[str] = set()


def module_files() -> dict[str, Path]:
    """Dotted name -> file of every Python module of the package (packages by their __init__)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """Import statements that run when the module is loaded (not in functions or TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def _targets(node: ast.stmt, name: str, is_package: bool) -> list[str]:
    """Dotted names an import statement of module ``name`` asks for."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = name.split(".") if is_package else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> package modules its loading imports (with their parent packages)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        running = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for node in _module_level(ast.parse(path.read_text()).body):
            for target in _targets(node, name, is_package):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in files and prefix not in running:
                        edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the graph is small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_relative_and_parent_package_imports():
    graph = import_graph()
    assert "mnemo_fast.codes" in graph["mnemo_fast.train"]          # from .codes import ...
    assert "mnemo_fast.evaluation.accuracy" in graph["mnemo_fast.evaluation.metrics"]
    assert {"mnemo_fast.reference", "mnemo_fast.reference.fisher"} <= graph["mnemo_fast.evaluation.metrics"]
    assert "mnemo_fast.reference" not in graph["mnemo_fast.evaluation.accuracy"]  # import in a function
    assert "mnemo_fast.evaluation" not in graph["mnemo_fast.evaluation.metrics"]  # its own package
    assert "mnemo_fast" not in graph["mnemo_fast.cli"]


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles_but_the_known_ones():
    unknown = [c for c in cycles(import_graph()) if not any(c <= known for known in KNOWN_CYCLES)]
    assert not unknown, f"module-level import cycles: {[sorted(c) for c in unknown]}"


CHILD = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    import numpy, torch, torch.func, torch.distributed.tensor, torch.distributed.fsdp  # loaded once
    import safetensors.torch, tqdm.auto
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("FAILED", " ".join(failed))
    """
)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(module_files())
    assert len(names) > 30 and "mnemo_fast.evaluation.experiment" in names
    env_code = "import sys; assert not any(m.startswith('mnemo_fast') for m in sys.modules)"
    done = subprocess.run([sys.executable, "-c", env_code + "\n" + CHILD, *names],
                          capture_output=True, text=True, timeout=600, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    failed = set(done.stdout.strip().splitlines()[-1].split()[1:]) - KNOWN_ALONE_FAILURES
    assert not failed, f"modules that fail to import alone: {failed}\n{done.stderr[-4000:]}"
