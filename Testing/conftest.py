"""Shared pytest fixtures: the real data folder (skipped when absent) and one LiteMedSAM backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA_DIR = Path(os.environ.get("FEWSHOTSAM_DATA", ROOT.parent / "shared" / "data"))
CHAOS_DIR = DATA_DIR / "chaos_t2"
CT_DIR = DATA_DIR / "totalseg_ct"
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
