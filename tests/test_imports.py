"""The import graph of clsuite: no circles (imports inside functions count; those under TYPE_CHECKING do not)."""
import ast
from pathlib import Path

import clsuite

ROOT = Path(clsuite.__file__).parent
PACKAGE = {"clsuite": ROOT, "clsuite.strategies": ROOT.parent / "strategies",
           "clsuite.benchmarks": ROOT.parent / "benchmarks"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGE.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports anywhere but under ``if TYPE_CHECKING:``."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import flatness`
        for child in ast.iter_child_nodes(node):
            visit(child)

    tree = ast.parse(path.read_text())
    visit(tree)
    if is_pkg and "iter_modules(__path__)" in path.read_text():  # imports every submodule at run time
        found.update(m for m in known if m.rpartition(".")[0] == name)
    out = set()
    for mod in found:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name and not name.startswith(mod + "."):  # a package's own __init__ is not an edge
            out.add(mod)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_circle():
    cycles = _cycles(import_graph())
    assert not cycles, f"import circles: {cycles}"


# Commands sit above the library: nothing in the library imports them, and reports never import the run machinery.
COMMANDS = ("clsuite.cli", "clsuite.tune", "clsuite.sweep", "clsuite.runner", "clsuite.reports")
RUN_MACHINERY = ("clsuite.cli", "clsuite.sweep", "clsuite.runner", "clsuite.engine", "clsuite.checkpoint")


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_no_module_imports_one_above_it():
    g = import_graph()
    order = ["clsuite.runner", "clsuite.sweep", "clsuite.tune", "clsuite.cli"]  # each may import those before it
    bad = [(m, d) for m, deps in g.items() for d in deps
           if _under(d, COMMANDS) and not _under(m, COMMANDS)]
    bad += [(m, d) for m, deps in g.items() if _under(m, ("clsuite.reports",)) for d in deps
            if _under(d, RUN_MACHINERY)]
    bad += [(m, d) for m, deps in g.items() if m in order for d in deps if d in order and order.index(d) > order.index(m)]
    assert not bad, f"imports of a layer above: {bad}"


def test_the_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    assert "clsuite.runner" in g["clsuite.cli"]  # cli imports the runner inside its commands
    assert "clsuite.engine" not in g["clsuite.checkpoint"]  # only under TYPE_CHECKING there
