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


# The Extensions Index catalog-entry schema that FewShotSAM.json names (Slicer's
# Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json): its required keys and its properties.
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
CATALOG_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                      "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def test_extension_metadata_has_no_placeholders_and_an_index_entry():
    import json

    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "PLACEHOLDER" not in cmake.upper()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "(.*?)"\)', cmake).group(1)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c.strip()) for c in contributors.split(","))
    assert re.search(r"Slicer 5\.10", cmake)
    entry = json.loads((REPO / "FewShotSAM.json").read_text())
    assert entry["$schema"] == CATALOG_SCHEMA
    for key, value in entry.items():  # the schema allows no other key
        assert key in CATALOG_PROPERTIES and isinstance(value, CATALOG_PROPERTIES[key]), key
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == "Segmentation"
    missing = [key for key in CATALOG_REQUIRED if key not in entry]
    if "scm_url" in entry:
        assert re.fullmatch(r"https://\S+", entry["scm_url"]) and "PLACEHOLDER" not in entry["scm_url"].upper()
    else:  # not known before the repository is public: the entry is incomplete, and the docs say so
        docs = (REPO / "docs" / "SLICER.md").read_text()
        sentences = re.split(r"(?<=\.)\s+", " ".join(docs.split()))
        assert any("`scm_url`" in s and "`FewShotSAM.json`" in s and "published" in s for s in sentences), \
            "FewShotSAM.json has no scm_url and docs/SLICER.md does not say it is added on publication"
        missing.remove("scm_url")
    assert missing == [], f"FewShotSAM.json lacks the required {missing}"


def test_pip_ensure_is_asked_to_install_in_testing_mode_too():
    """Slicer 5.12's ``slicer.packaging.pip_ensure`` skips installing in testing mode unless told not to
    (the self-test under CTest then fails with packages still missing); older signatures get only the
    keywords they accept."""
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from FewShotSAMHelpers.dependencies import pip_ensure_options

    def pip_ensure_5_12(requirements, constraints=None, skip_packages=None, prompt_install=True,
                        prompt_restart=True, requester=None, skip_in_testing=True, show_progress=True):
        """The signature of slicer.packaging.pip_ensure in Slicer 5.12."""

    def pip_ensure_without_testing_switch(requirements, constraints=None, prompt_install=True, requester=None):
        """A pip_ensure that has no testing-mode switch."""

    options = pip_ensure_options(pip_ensure_5_12, "/tmp/constraints.txt")
    assert options == {"constraints": "/tmp/constraints.txt", "prompt_install": False,
                       "requester": "Segment from one example", "show_progress": True, "skip_in_testing": False}
    assert pip_ensure_options(pip_ensure_without_testing_switch, "c.txt") == {
        "constraints": "c.txt", "prompt_install": False, "requester": "Segment from one example"}
