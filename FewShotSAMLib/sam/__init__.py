"""SAM backends: one interface (``SamBackend``, backend.py), one file per family, the runtimes beside them
(device.py, runtime_choice.py, encoder_runtimes.py, decoder_runtimes.py, onnx_export.py), weights and the
embedding cache.

Importing this package imports no torch (the names are read by the Slicer panel before its dependencies
are installed); ``SamBackend``, ``DecodeResult`` and ``resolve_device`` are imported when first used."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

from ..errors import UserInputError
from .names import BACKEND_NAMES, DEFAULT_SAM

if TYPE_CHECKING:
    from ..options import RuntimeOptions
    from .backend import DecodeResult, SamBackend
    from .device import resolve_device


def __getattr__(name: str):
    if name in ("DecodeResult", "SamBackend"):
        from . import backend

        return getattr(backend, name)
    if name == "resolve_device":
        from .device import resolve_device

        return resolve_device
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_backend(sam: str = DEFAULT_SAM, device: str = "auto", checkpoint: Optional[str] = None,
                 options: Optional["RuntimeOptions"] = None) -> "SamBackend":
    """Build a backend from a name ('litemedsam', 'litemedsam-points', 'vit_h', 'vit_l', 'vit_b', 'vit_t') and an optional
    checkpoint (local path, 'hf:owner/repo/file' or 'owner/repo:file'), or from a checkpoint path alone
    (the family is then read from the file's weights). ``options``: how it runs and where downloaded
    weights go (None: the FEWSHOTSAM_* environment variables).
    """
    name = (sam or DEFAULT_SAM).lower()
    if name in ("litemedsam", "litemedsam-points"):
        from .litemedsam import LiteMedSAMBackend

        return LiteMedSAMBackend(checkpoint, device, variant=name, options=options)
    if name in ("vit_h", "vit_l", "vit_b", "vit_t"):
        from .segment_anything_vit import SegmentAnythingBackend

        return SegmentAnythingBackend(name, checkpoint, device, options=options)
    if Path(sam).exists() or ":" in sam:
        from .segment_anything_vit import backend_from_checkpoint

        return backend_from_checkpoint(sam, device, options=options)
    raise UserInputError(
        f"Unknown SAM model '{sam}'; use one of {', '.join(BACKEND_NAMES)} or the path of a checkpoint file."
    )


__all__ = ["BACKEND_NAMES", "DEFAULT_SAM", "DecodeResult", "SamBackend", "load_backend", "resolve_device"]
