"""No import cycles in the library or the lab, counting the imports made inside functions (read from the
source with ``ast``, nothing is imported): the inference side never reaches back into training or
evaluation, and the library never imports the lab."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "FewShotSAMLib", ROOT / "tools" / "fewshotsam_lab")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for f in pkg.rglob("*.py"):
            if "__pycache__" in f.parts:
                continue
            parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the packages it imports anywhere in its file (a package's ``__init__``
    counts too: importing ``a.b.c`` runs ``a`` and ``a.b``)."""
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # a name imported from a module: the module
                    target = target.rpartition(".")[0]
                while target:
                    # a module's own packages are not counted: their __init__ runs first, and one that
                    # imports its submodules (sam/__init__ builds backends) is no cycle
                    if target != mod and target in files and not mod.startswith(target + "."):
                        graph[mod].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "FewShotSAMLib.fob.inference" in graph["FewShotSAMLib.prompts.fob"]  # imported inside predict()
    assert "FewShotSAMLib.engine" in graph["fewshotsam_lab.evaluate"]


def test_no_import_cycle():
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_library_never_imports_the_lab():
    graph = import_graph()
    assert not [(m, t) for m, ts in graph.items() if m.startswith("FewShotSAMLib") for t in ts
                if t.startswith("fewshotsam_lab")]
