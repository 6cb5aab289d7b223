"""FoB (Focus on Background): the background-prompt network on frozen SAM embeddings (``model.py``) and
what its inference needs besides (``inference.py``); reached through ``prompts/fob.py``. The shipped
weights are package data (``weights/``), one file per SAM image encoder (``shipped_weights``). Its
self-supervised training is research tooling: ``tools/fewshotsam_lab/fob_training/``
(``python tools/lab.py train-fob``).

This module imports nothing heavy: the Slicer panel and ``auto`` read the shipped metadata through it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..sam.names import DEFAULT_SAM

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Shipped weights by the SAM model whose embeddings they read; any other model (LiteMedSAM and its
# point-aware variant, which share LiteMedSAM's encoder) gets LiteMedSAM's, and FoBGenerator says when
# the embeddings do not match.
SHIPPED = {"vit_t": "fob_vit_t.pt"}
LITEMEDSAM_WEIGHTS = WEIGHTS_DIR / "fob.pt"


def shipped_weights(sam: Optional[str] = None) -> Path:
    """The shipped FoB weights file for the SAM model ``sam`` (a name; None for the default model)."""
    name = str(sam or DEFAULT_SAM).lower()
    return WEIGHTS_DIR / SHIPPED[name] if name in SHIPPED else LITEMEDSAM_WEIGHTS
