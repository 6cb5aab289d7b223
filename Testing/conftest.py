"""Shared pytest fixtures: the real data folder (skipped when absent) and one LiteMedSAM backend.

The repository root and ``tools/`` are put on ``sys.path``: the library of this checkout, and the research
tooling (``fewshotsam_lab``), whose ``datasets.py`` says where the data is (``FEWSHOTSAM_DATA``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tools", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fewshotsam_lab import datasets  # noqa: E402

DATA_DIR = datasets.data_root()
CHAOS_DIR = datasets.chaos_dir(DATA_DIR)
CT_DIR = datasets.totalseg_dir(DATA_DIR)
# The persistent embedding cache the real-data tests share (git-ignored): each CHAOS slice is encoded
# once per machine, whichever test needs it first.
SHARED_EMBEDDINGS = ROOT / ".cache" / "embeddings"


def require(path: Path) -> Path:
    """Skip the calling test, with a reason, when real data ``path`` is absent."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set FEWSHOTSAM_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def litemedsam():
    """The embedded LiteMedSAM backend on CPU, loaded once per test session."""
    from FewShotSAMLib.sam import load_backend

    return load_backend("litemedsam", "cpu")
