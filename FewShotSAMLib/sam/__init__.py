"""SAM backends: one interface (``SamBackend``), one file per family, weights and the embedding cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserInputError
from .base import DecodeResult, SamBackend, resolve_device

BACKEND_NAMES = ("litemedsam", "vit_h", "vit_l", "vit_b", "vit_t")


def load_backend(sam: str = "litemedsam", device: str = "auto", checkpoint: Optional[str] = None) -> SamBackend:
    """Build a backend from a name ('litemedsam', 'vit_h', 'vit_l', 'vit_b', 'vit_t') and an optional
    checkpoint (local path, 'hf:owner/repo/file' or 'owner/repo:file'), or from a checkpoint path alone
    (the family is then read from the file's weights).
    """
    name = (sam or "litemedsam").lower()
    if name == "litemedsam":
        from .litemedsam import LiteMedSAMBackend

        return LiteMedSAMBackend(checkpoint, device)
    if name in ("vit_h", "vit_l", "vit_b", "vit_t"):
        from .segment_anything_vit import SegmentAnythingBackend

        return SegmentAnythingBackend(name, checkpoint, device)
    if Path(sam).exists() or ":" in sam:
        from .segment_anything_vit import backend_from_checkpoint

        return backend_from_checkpoint(sam, device)
    raise UserInputError(
        f"Unknown SAM model '{sam}'; use one of {', '.join(BACKEND_NAMES)} or the path of a checkpoint file."
    )


__all__ = ["BACKEND_NAMES", "DecodeResult", "SamBackend", "load_backend", "resolve_device"]
