"""What a clinician installs: a wheel built from this repository carries the shipped weights (FoB, the
point-aware LiteMedSAM decoder) with their metadata, so ``--generator fob`` and the default model work
from an installed wheel; neither the wheel nor the Slicer build (which takes every file of the
FewShotSAMLib folder) carries the research tooling (tools/fewshotsam_lab: evaluation, benchmarks,
training, demo), and the library never imports it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Module names of the research tooling (any folder): evaluation, click and speed benchmarks, training, demo.
RESEARCH = re.compile(r"(^|/)(evaluate|bench\w*|clickbench|train\w*|demo|episodes|losses|supervoxels|point_decoder|"
                      r"precompute\w*|slicer_rerun|fewshotsam_lab)(/|\.py$)")
SHIPPED = ("FewShotSAMLib/fob/weights/fob.pt", "FewShotSAMLib/fob/weights/fob.json",
           "FewShotSAMLib/fob/weights/fob_vit_t.pt", "FewShotSAMLib/fob/weights/fob_vit_t.json",
           "FewShotSAMLib/sam/checkpoints/litemedsam_points.pt", "FewShotSAMLib/sam/checkpoints/litemedsam_points.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed: {proc.stderr[-2000:]}")
    wheels = list(out.glob("fewshotsam-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_carries_the_shipped_weights_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for member in SHIPPED:
            assert member in names, f"{member} is not in {wheel.name}"
            assert z.read(member) == (ROOT / member).read_bytes()


def test_shipped_weights_are_found_where_the_installed_library_looks():
    """The library looks for its weights inside its own package, not in the repository's folders."""
    from FewShotSAMLib.prompts import fob
    from FewShotSAMLib.sam import litemedsam

    lib = Path(fob.__file__).resolve().parents[1]
    assert fob.SHIPPED_WEIGHTS.is_relative_to(lib) and fob.SHIPPED_WEIGHTS.is_file()
    assert litemedsam.CHECKPOINTS.is_relative_to(lib) and (litemedsam.CHECKPOINTS / "litemedsam_points.pt").is_file()


def test_wheel_carries_no_research_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        research = [n for n in z.namelist() if RESEARCH.search(n)]
    assert research == [], f"{wheel.name} ships research tooling: {research}"
    assert not RESEARCH.search("FewShotSAMLib/engine.py") and RESEARCH.search("FewShotSAMLib/fob/train.py")


def test_library_folder_holds_no_research_module_and_never_imports_the_lab():
    """The Slicer build globs every .py of FewShotSAMLib/ (its CMakeLists.txt): the folder itself must
    hold only the library."""
    lib = ROOT / "FewShotSAMLib"
    files = [p.relative_to(ROOT).as_posix() for p in lib.rglob("*.py") if "__pycache__" not in p.parts]
    assert files and [f for f in files if RESEARCH.search(f)] == []
    for f in files:
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "fewshotsam_lab" for n in names), f"{f} imports the research tooling"
