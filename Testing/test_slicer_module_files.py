"""The Slicer module folder as Slicer and its build see it (no MRML needed).

Slicer registers every top-level ``.py`` of a module folder as a module and fails to instantiate one that
defines no class of its own name (qSlicerScriptedLoadableModuleFactory); the helper package is built from an
explicit file list, so a file missing from it would be missing from the installed extension.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "FewShotSAM"
HELPERS = MODULE_DIR / "FewShotSAMHelpers"


def test_every_top_level_python_file_defines_a_class_of_its_own_name():
    files = sorted(MODULE_DIR.glob("*.py"))
    assert files, f"no Python file in {MODULE_DIR}"
    for path in files:
        classes = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)}
        assert path.stem in classes, f"{path.name} defines no class '{path.stem}': Slicer would fail to load it"


def cmake_list(text: str, variable: str) -> list:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...) in the CMakeLists.txt"
    return [w for w in match.group(1).split() if not w.startswith("#")]


def test_helper_package_is_built_with_subdir_from_a_complete_file_list():
    text = (HELPERS / "CMakeLists.txt").read_text()
    assert "WITH_SUBDIR" in text
    listed = {name[:-3] if name.endswith(".py") else name for name in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    present = {p.stem for p in HELPERS.glob("*.py")}
    assert listed == present, f"CMake list {sorted(listed)} differs from the package's files {sorted(present)}"
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "add_subdirectory(FewShotSAMHelpers)" in module_cmake
    for resource in cmake_list(module_cmake, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "FewShotSAM")).is_file(), resource


def test_self_test_is_registered_with_ctest_and_never_skips():
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"if\(BUILD_TESTING\)\s*(#.*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)",
                     module_cmake)
    source = (MODULE_DIR / "FewShotSAM.py").read_text()
    assert "skipTest" not in source


def test_requirements_file_lists_every_pip_installed_module():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from FewShotSAMHelpers import dependencies

    listed = dependencies.read_requirements()
    pip_installed = set(dependencies.REQUIRED_MODULES.values()) - set(dependencies.TORCH_DISTRIBUTIONS)
    assert {dependencies._canonical(d) for d in pip_installed} == set(listed)
    assert "torchvision" in dependencies.REQUIRED_MODULES  # segment-anything imports it


def test_extension_metadata_has_no_placeholders_and_an_index_entry():
    import json

    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "PLACEHOLDER" not in cmake.upper()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "(.*?)"\)', cmake).group(1)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c.strip()) for c in contributors.split(","))
    assert re.search(r"Slicer 5\.10", cmake)
    entry = json.loads((REPO / "FewShotSAM.json").read_text())
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == "Segmentation"
