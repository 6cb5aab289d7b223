"""SAM backends: one interface (``SamBackend``), one file per family, weights and the embedding cache.

Importing this package imports no torch (the names are read by the Slicer panel before its dependencies
are installed); ``SamBackend``, ``DecodeResult`` and ``resolve_device`` are imported from ``base`` when
first used."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

from ..errors import UserInputError
from .names import BACKEND_NAMES, DEFAULT_SAM

if TYPE_CHECKING:
    from .base import DecodeResult, SamBackend, resolve_device


def __getattr__(name: str):
    if name in ("DecodeResult", "SamBackend", "resolve_device"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



def load_backend(sam: str = DEFAULT_SAM, device: str = "auto", checkpoint: Optional[str] = None) -> "SamBackend":
    """Build a backend from a name ('litemedsam', 'litemedsam-points', 'vit_h', 'vit_l', 'vit_b', 'vit_t') and an optional
    checkpoint (local path, 'hf:owner/repo/file' or 'owner/repo:file'), or from a checkpoint path alone
    (the family is then read from the file's weights).
    """
    name = (sam or DEFAULT_SAM).lower()
    if name in ("litemedsam", "litemedsam-points"):
        from .litemedsam import LiteMedSAMBackend

        return LiteMedSAMBackend(checkpoint, device, variant=name)
    if name in ("vit_h", "vit_l", "vit_b", "vit_t"):
        from .segment_anything_vit import SegmentAnythingBackend

        return SegmentAnythingBackend(name, checkpoint, device)
    if Path(sam).exists() or ":" in sam:
        from .segment_anything_vit import backend_from_checkpoint

        return backend_from_checkpoint(sam, device)
    raise UserInputError(
        f"Unknown SAM model '{sam}'; use one of {', '.join(BACKEND_NAMES)} or the path of a checkpoint file."
    )


__all__ = ["BACKEND_NAMES", "DEFAULT_SAM", "DecodeResult", "SamBackend", "load_backend", "resolve_device"]
