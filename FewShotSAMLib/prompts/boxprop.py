"""Box propagation: the neighbouring slice's mask box, slightly enlarged, prompts SAM on the next slice
(what MedSAM's Slicer plugin does). No feature matching; presence is always 1, so the engine's extent
rules (area, overlap with the neighbour, SAM score) decide where the target ends.
"""

from __future__ import annotations

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support


def mask_box(mask: np.ndarray, margin: float = 0.0, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """(row0, col0, row1, col1) of a boolean mask, enlarged by ``margin`` pixels and clipped to ``shape``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = shape or mask.shape
    return np.array([max(0, rows.min() - margin), max(0, cols.min() - margin),
                     min(h - 1, rows.max() + margin), min(w - 1, cols.max() + margin)], np.float32)


class BoxPropagation:
    """Prompt each slice with the enlarged bounding box of the neighbouring slice's mask."""

    name = "boxprop"

    def __init__(self, margin: float = 3.0) -> None:
        self.margin = float(margin)

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """Box of the neighbour's mask (the support's for the slice next to it)."""
        ref = context.neighbour_mask if context.neighbour_mask is not None else support.mask
        box = mask_box(ref, self.margin * backend.input_size / 256.0)
        return Prompts(box=box) if box is not None else Prompts()
