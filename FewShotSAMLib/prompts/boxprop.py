"""Box propagation: the neighbouring slice's mask box, slightly enlarged, prompts SAM on the next slice
(what MedSAM's Slicer plugin does). No feature matching; presence is always 1, so the engine's extent
rules (area, overlap with the neighbour, SAM score) decide where the target ends.
"""

from __future__ import annotations

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import mask_box

BOX_MARGIN = 3.0  # pixels at 256 added around the neighbour's mask box


class BoxPropagation:
    """Prompt each slice with the enlarged bounding box of the neighbouring slice's mask."""

    name = "boxprop"

    def __init__(self, margin: float = BOX_MARGIN) -> None:
        self.margin = float(margin)

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """Box of the neighbour's mask (the support's for the slice next to it)."""
        ref = context.neighbour_mask if context.neighbour_mask is not None else support.mask
        box = mask_box(ref, self.margin * backend.input_size / 256.0)
        return Prompts(box=box) if box is not None else Prompts()
