"""Import cycles among the library's modules, counting every import (inside functions and ``if
TYPE_CHECKING`` blocks too), read from the source with ``ast``. A parent package that Python imports on
the way to a submodule is not counted: it is already being imported when its submodule runs.

Run as a script to print the cycles: ``python Testing/test_imports.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "FewShotSAMLib"

# Cycles that remain, each as its sorted modules; when one is broken, remove it here.
# evaluate -> prompts.fob -> fob.train -> evaluate: the harness and the FoB training leave the library.
KNOWN_CYCLES = {
    ("FewShotSAMLib.evaluate", "FewShotSAMLib.fob.train", "FewShotSAMLib.prompts.fob"),
}
# Modules that must never be part of a cycle (the backends and their runtimes, the options, the data types).
ACYCLIC = ("FewShotSAMLib.sam", "FewShotSAMLib.options", "FewShotSAMLib.prompt_types", "FewShotSAMLib.prompts.base")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                # 'from pkg import module' imports the module; 'from module import name' the module itself
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each as its sorted modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = set()

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_imports_inside_functions_and_type_checking_blocks():
    graph = import_graph()
    assert "FewShotSAMLib.sam.backend" in graph["FewShotSAMLib.prompts.base"]  # under TYPE_CHECKING
    assert "FewShotSAMLib.sam.litemedsam" in graph["FewShotSAMLib.sam"]  # inside load_backend
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def test_no_cycle_touches_the_backends_the_options_or_the_data_types():
    for component in cycles(import_graph()):
        assert not any(m == a or m.startswith(a + ".") for m in component for a in ACYCLIC), component


def test_the_remaining_cycles_are_the_known_ones():
    assert cycles(import_graph()) == KNOWN_CYCLES


def test_the_data_types_import_nothing_from_the_package():
    assert import_graph()["FewShotSAMLib.prompt_types"] == set()


if __name__ == "__main__":
    found = cycles(import_graph())
    for component in sorted(found):
        print(" <-> ".join(component))
    sys.exit(1 if found - KNOWN_CYCLES else 0)
