"""PerSAM's cascaded refinement (Zhang et al., ICLR 2024), shared by the multi-pass generators (``persam``,
``p2sam``): after a first decode from the generator's points, a second pass with the first mask's logits
as mask input; the returned prompts carry the second mask's box and logits for the caller's final pass.
"""

from __future__ import annotations

import numpy as np

from ..shape import mask_box
from . import features as F
from .base import Prompts, QueryContext


def refine_with_mask_input(query, backend, context: QueryContext, summ, sim: np.ndarray, pos: np.ndarray,
                           neg: np.ndarray, first, presence_midpoint: float) -> Prompts:
    """PerSAM's cascaded refinement, shared by the multi-pass generators: a second pass with the first
    mask's logits as mask input (and its box on box-trained backends); the returned prompts carry the box
    of the second mask and its logits for the caller's final pass, with the calibrated presence."""
    mask1 = first.mask & context.valid
    box2 = mask_box(mask1) if backend.prefers_box else None
    second = backend.decode(query, Prompts(pos, neg, box2, mask_input=first.low_res), multimask=True)
    mask2 = second.mask & context.valid
    if not mask2.any():
        mask2 = mask1
    presence = F.presence_score(summ.levels, sim, F.mask_to_grid(mask2, summ.grid), presence_midpoint)
    return Prompts(pos, neg, mask_box(mask2), presence=presence,
                   mask_input=second.low_res if mask2.any() else None)
