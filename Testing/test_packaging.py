"""What a clinician installs: a wheel built from this repository carries the shipped weights (FoB, the
point-aware LiteMedSAM decoder) with their metadata, so ``--generator fob`` and the default model work
from an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("FewShotSAMLib/fob/weights/fob.pt", "FewShotSAMLib/fob/weights/fob.json",
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
