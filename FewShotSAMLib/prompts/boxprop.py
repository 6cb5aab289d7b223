"""Box propagation: the neighbouring slice's mask box, slightly enlarged, prompts SAM on the next slice
(what MedSAM's Slicer plugin does). With a backend that allows it (``SamBackend.grows_box``: LiteMedSAM) the box
may grow: where SAM's answer reaches its edge the engine widens that side by ``BOX_GROWTH`` and decodes again
(``Prompts.box_growth``), so that an organ that widens from one slice to the next is not cut to its
neighbour's box. No feature matching; presence is always 1, so the
engine's extent rules (area, overlap with the neighbour, SAM score) decide where the target ends.
"""

from __future__ import annotations

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import mask_box

BOX_MARGIN = 3.0  # pixels at 256 added around the neighbour's mask box
# Pixels at 256 by which a side the answer reaches is widened (up to engine.BOX_GROWTH_STEPS times). CHAOS,
# product protocol, 5 folds, against a fixed box: box propagation 87.17 -> 87.50, FoB's propagation 88.01 -> 88.95
# (docs/RESULTS.md, "The neighbour's box grows with the target").
BOX_GROWTH = 8.0


class BoxPropagation:
    """Prompt each slice with the enlarged bounding box of the neighbouring slice's mask."""

    name = "boxprop"

    def __init__(self, margin: float = BOX_MARGIN, growth: float = BOX_GROWTH) -> None:
        self.margin = float(margin)
        self.growth = float(growth)

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """Box of the neighbour's mask, which may grow where the backend allows it (``grows_box``); the
        support's, fixed, when no neighbour is known (a query slice of another volume)."""
        follows = context.neighbour_mask is not None
        scale = backend.input_size / 256.0
        box = mask_box(context.neighbour_mask if follows else support.mask, self.margin * scale)
        if box is None:
            return Prompts()
        grows = follows and getattr(backend, "grows_box", False)
        return Prompts(box=box, box_growth=self.growth * scale if grows else 0.0)
