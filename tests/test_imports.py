"""Every module imports alone, and module-level imports inside mnemo_fast form no cycle.

Fresh imports: one subprocess imports the third-party libraries once, then forks one child per
module; each child starts with no ``mnemo_fast`` module loaded and imports only its module, so
a module that works only when another one happened to be imported first fails here.

Cycles: a static graph of the imports that run when a module is loaded (``ast``; imports
inside functions and under ``if TYPE_CHECKING`` are left out). Importing ``a.b.c`` first runs
the packages ``a.b`` and ``a``, so those count as edges too, except the importer's own parent
packages (already running by then).

Lazy imports counted: a second, strict graph adds every import that may run later (inside
functions, ``importlib.import_module`` of a lazy table, a module ``__getattr__``'s exports); it
has no cycle either, and the floors hold on it: the ground floor (``dtypes``, ``devices``, ``stack``, ``modeling``,
``sharding``, ``public``) imports nothing else of the package, and ``reference/`` nothing of ``fast/`` or
``distributed/`` (docs/LAYOUT.md, "Import rules").
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mnemo_fast

PACKAGE = "mnemo_fast"
ROOT = Path(mnemo_fast.__file__).resolve().parent

#: No cycle and no module that fails to import first is tolerated.
KNOWN_CYCLES: list[set[str]] = []
KNOWN_ALONE_FAILURES: set[str] = set()


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every Python module of the package (packages by their __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
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
    assert "mnemo_fast.codes" in graph["mnemo_fast.training.train"]  # from ..codes import ...
    assert "mnemo_fast.evaluation.accuracy" in graph["mnemo_fast.evaluation.metrics"]
    assert {"mnemo_fast.reference", "mnemo_fast.reference.fisher"} <= graph["mnemo_fast.fast.engine"]
    assert "mnemo_fast.fast._ext" not in graph["mnemo_fast.engines"]  # import in a function
    assert "mnemo_fast.evaluation" not in graph["mnemo_fast.evaluation.metrics"]  # its own package
    assert "mnemo_fast" not in graph["mnemo_fast.cli"]


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles_but_the_known_ones():
    unknown = [c for c in cycles(import_graph()) if not any(c <= known for known in KNOWN_CYCLES)]
    assert not unknown, f"module-level import cycles: {[sorted(c) for c in unknown]}"


# ---- lazy imports counted ------------------------------------------------------------------
#
# The strict graph counts every import a module may run, whenever it runs: each import
# statement of the file wherever it stands (functions, classes, ``if TYPE_CHECKING``) and each
# ``importlib.import_module`` call (its argument a string, or a name or subscript of a
# module-level table of strings, such as a lazy table name -> module; anything else fails the
# test). A module with a ``__getattr__`` (lazy exports) gets a second node ``module:__getattr__``
# holding what that function imports: the edge to it is drawn from every importer that may ask
# the module for a name it does not define, i.e. ``from module import name`` of such a name, and
# ``import module`` or ``from parent import module``, which hand the module itself out. Importing
# one of a package's submodules runs the package's body, not its ``__getattr__``.

LAZY = ":__getattr__"

#: The ground floor (docs/LAYOUT.md): modules that import nothing of the package but each other.
GROUND_FLOOR = {"mnemo_fast.dtypes", "mnemo_fast.fisher_sums", "mnemo_fast.modeling", "mnemo_fast.sharding",
                "mnemo_fast.devices", "mnemo_fast.stack", "mnemo_fast.public"}


def _load_time(body: list[ast.stmt]):
    """Statements that run when the module is loaded, into blocks but not functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            for block in ("body", "orelse", "finalbody"):
                yield from _load_time(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _load_time(handler.body)


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module binds at load time (its ``__getattr__`` is never asked for these)."""
    names = set()
    for node in _load_time(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With)):
            names.update(n.id for n in ast.walk(node)
                         if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


def _string_tables(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level name -> the strings it holds: one string, or a dict (its values), list,
    tuple or set of strings."""
    tables = {}
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        value = node.value
        items = (value.values if isinstance(value, ast.Dict)
                 else value.elts if isinstance(value, (ast.List, ast.Tuple, ast.Set)) else [value])
        strings = [v.value for v in items if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        if items and len(strings) == len(items):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    tables[target.id] = strings
    return tables


def _is_dynamic_import(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "__import__")


def _dynamic_targets(call: ast.Call, name: str, is_package: bool, tables: dict[str, list[str]]) -> list[str]:
    """Absolute names an ``importlib.import_module(spec[, package])`` (or ``__import__(spec)``)
    call may import."""
    spec = call.args[0] if call.args else None
    if isinstance(spec, ast.Constant) and isinstance(spec.value, str):
        specs = [spec.value]
    elif isinstance(spec, ast.Name) and spec.id in tables:
        specs = tables[spec.id]
    elif isinstance(spec, ast.Subscript) and isinstance(spec.value, ast.Name) and spec.value.id in tables:
        specs = tables[spec.value.id]
    else:
        raise AssertionError(f"{name}, line {call.lineno}: cannot tell which module import_module "
                             "imports; pass it a string or a module-level table of strings")
    anchor = call.args[1] if len(call.args) > 1 and not isinstance(call.func, ast.Name) else None
    if isinstance(anchor, ast.Name) and anchor.id == "__name__":
        package = name
    elif isinstance(anchor, ast.Name) and anchor.id == "__package__":
        package = name if is_package else name.rpartition(".")[0]
    else:
        package = anchor.value if isinstance(anchor, ast.Constant) else None
    return [importlib.util.resolve_name(s, package) if s.startswith(".") else s for s in specs]


def _hook(tree: ast.Module) -> ast.FunctionDef | None:
    """The module's ``__getattr__`` (lazy exports), if it has one."""
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"), None)


def strict_import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> package modules it may import at any time, lazy imports included; a module
    with a ``__getattr__`` has a second node ``module:__getattr__`` for what its lazy exports
    import (see the comment above)."""
    files = module_files(root, package)
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    defined = {name: _defined_names(tree) for name, tree in trees.items()}
    hooked = {name for name, tree in trees.items() if _hook(tree) is not None}
    graph = {name + LAZY: set() for name in hooked}
    for name, tree in trees.items():
        is_package = files[name].name == "__init__.py"
        running = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        tables = _string_tables(tree)
        hook = _hook(tree)
        in_hook = {id(n) for n in ast.walk(hook)} if hook is not None else set()
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                handed_out, asked = set(targets), []
            elif isinstance(node, ast.ImportFrom):
                targets = _targets(node, name, is_package)
                base = targets[0]
                handed_out = {t for t in targets[1:] if t in files}
                asked = [(base, t.rpartition(".")[2]) for t in targets[1:] if t not in files]
            elif _is_dynamic_import(node):
                targets, handed_out, asked = _dynamic_targets(node, name, is_package, tables), set(), []
            else:
                continue
            edges = graph[name + LAZY if id(node) in in_hook else name]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in files and prefix not in running:
                        edges.add(prefix)
            edges.update(m + LAZY for m in handed_out if m in hooked and m != name)
            edges.update(m + LAZY for m, attr in asked
                         if m in hooked and (attr == "*" or attr not in defined[m]))
    return graph


def a_loop(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One shortest import loop through the modules of a cycle (for the failure message)."""
    best: list[str] | None = None
    for start in sorted(component):
        paths, frontier = {start: [start]}, [start]
        while frontier and (best is None or len(paths[frontier[0]]) + 1 < len(best)):
            following = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start and (best is None or len(paths[v]) + 1 < len(best)):
                        best = paths[v] + [start]
                    elif w in component and w not in paths:
                        paths[w] = paths[v] + [w]
                        following.append(w)
            frontier = following
    return best or []


def _short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".")


def test_strict_graph_counts_function_imports_and_lazy_exports():
    graph = strict_import_graph()
    assert "mnemo_fast.fast.engine" in graph["mnemo_fast.engines"]                 # in default_engine()
    assert "mnemo_fast.reference.engine" in graph["mnemo_fast.engines" + LAZY]     # its __getattr__
    assert {"mnemo_fast.api", "mnemo_fast.method", "mnemo_fast.codes"} <= graph["mnemo_fast.reference" + LAZY]
    assert "mnemo_fast.distributed.engine" in graph["mnemo_fast.distributed" + LAZY]  # the lazy table
    assert "mnemo_fast.evaluation.experiment" in graph["mnemo_fast.cli"]            # in main()
    assert "mnemo_fast.engines" + LAZY in graph["mnemo_fast.session"]               # from . import engines
    # a submodule's import runs its package's body, not the package's __getattr__
    assert "mnemo_fast.reference" + LAZY not in graph["mnemo_fast.fast.ops"]
    assert "mnemo_fast.reference" in graph["mnemo_fast.fast.ops"]
    assert "mnemo_fast.reference.fisher" + LAZY not in graph  # no __getattr__, no second node


SMALL_PACKAGE = {
    "__init__.py": "import importlib\n_LAZY = {'thing': '.low'}\ndef __getattr__(name):\n"
                   "    return getattr(importlib.import_module(_LAZY[name], __name__), name)\n",
    "low.py": "def thing():\n    from .high import other  # lazy: in a function\n    return other\n",
    "high.py": "from pkg import thing  # a lazy export: pkg's __getattr__ runs\nother = 1\n",
    "sub/__init__.py": "def __getattr__(name):\n    from .. import high\n    return high\n",
    "sub/leaf.py": "",
    "side.py": "from .sub import leaf  # a submodule: sub's body runs, not its __getattr__\n",
}


def test_strict_graph_on_a_small_package(tmp_path):
    for rel, text in SMALL_PACKAGE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = strict_import_graph(tmp_path, "pkg")
    assert graph["pkg"] == set() and graph["pkg" + LAZY] == {"pkg.low"}
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.high"] == {"pkg" + LAZY}
    assert graph["pkg.side"] == {"pkg.sub", "pkg.sub.leaf"} and graph["pkg.sub" + LAZY] == {"pkg.high"}
    assert cycles(graph) == [{"pkg" + LAZY, "pkg.low", "pkg.high"}]
    assert a_loop(graph, cycles(graph)[0]) == ["pkg.high", "pkg" + LAZY, "pkg.low", "pkg.high"]
    unknown = "import importlib\ndef f(name):\n    return importlib.import_module(name)\n"
    (tmp_path / "side.py").write_text(unknown)
    with pytest.raises(AssertionError, match="cannot tell which module"):
        strict_import_graph(tmp_path, "pkg")


def test_cycle_finder_names_one_shortest_loop():
    graph = {"a": {"b", "x"}, "b": {"c"}, "c": {"a"}, "x": {"a"}}
    assert a_loop(graph, {"a", "b", "c", "x"}) == ["a", "x", "a"]


def test_no_import_cycles_lazy_imports_included():
    graph = strict_import_graph()
    found = cycles(graph)
    report = "\n".join(f"  {sorted(map(_short, c))}\n    e.g. {' -> '.join(map(_short, a_loop(graph, c)))}"
                       for c in found)
    assert not found, f"import cycles, lazy imports counted:\n{report}"


def floor_of(node: str) -> str:
    """The floor a node of the strict graph stands on: a first-level subpackage (``reference``,
    ``fast``, ``distributed``, ``evaluation``) for the modules in it, the module itself for a
    top-level one. A ``module:__getattr__`` node stays its own: the names a package hands out
    lazily (``mnemo_fast.reference``'s public namespace) stand above the modules under it."""
    return node if node.endswith(LAZY) else ".".join(node.split(".")[:2])


def floor_graph(graph: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """(floor -> floors it imports, (floor, floor) -> one module import that draws the edge)."""
    floors, why = {}, {}
    for module, targets in sorted(graph.items()):
        here = floor_of(module)
        floors.setdefault(here, set())
        for target in sorted(targets, key=lambda t: (-t.count("."), t)):  # the most precise witness
            there = floor_of(target)
            if there != here:
                floors[here].add(there)
                why.setdefault((here, there), f"{_short(module)} -> {_short(target)}")
    return floors, why


def test_floor_graph_folds_subpackages_but_not_lazy_exports():
    floors, why = floor_graph(strict_import_graph())
    assert "mnemo_fast.reference" in floors["mnemo_fast.fast"]                  # fast/ imports reference/
    assert "mnemo_fast.reference" + LAZY in floors                             # the namespace, apart
    assert "mnemo_fast.api" in floors["mnemo_fast.reference" + LAZY]
    assert "mnemo_fast.fast.engine" not in floors and "mnemo_fast.fast" in floors["mnemo_fast.engines"]
    assert why["mnemo_fast.fast", "mnemo_fast.reference"].startswith("fast.")


def test_no_import_cycles_between_floors_lazy_imports_included():
    floors, why = floor_graph(strict_import_graph())
    found = cycles(floors)
    report = []
    for component in found:
        loop = a_loop(floors, component)
        steps = ", ".join(why[a, b] for a, b in zip(loop, loop[1:]))
        report.append(f"  {sorted(map(_short, component))}\n"
                      f"    e.g. {' -> '.join(map(_short, loop))} ({steps})")
    assert not found, ("import cycles between floors (subpackages and top-level modules), lazy imports "
                       "counted:\n" + "\n".join(report))


def _imported(graph: dict[str, set[str]], floor: str) -> dict[str, set[str]]:
    """module (or its __getattr__) of ``floor`` (a package or a module) -> what it imports."""
    return {m: targets for m, targets in graph.items()
            if m.split(":")[0] == floor or m.startswith(floor + ".")}


def test_reference_imports_nothing_from_fast_or_distributed():
    above = ("mnemo_fast.fast", "mnemo_fast.distributed")
    found = sorted(f"{_short(m)} -> {_short(t)}" for m, targets in
                   _imported(strict_import_graph(), "mnemo_fast.reference").items()
                   for t in targets if any(t.split(":")[0] == a or t.startswith(a + ".") for a in above))
    assert not found, f"the reference imports from fast/ or distributed/ (lazy imports counted): {found}"


def test_the_ground_floor_imports_only_the_ground_floor():
    graph = strict_import_graph()
    assert GROUND_FLOOR <= graph.keys()
    found = sorted(f"{_short(m)} -> {_short(t)}" for m in GROUND_FLOOR for t in graph[m]
                   if t not in GROUND_FLOOR)
    assert not found, f"a ground-floor module imports from the floors above: {found}"


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
