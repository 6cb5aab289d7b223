"""PerSAM (Zhang et al., "Personalize Segment Anything Model with One Shot", ICLR 2024), training-free.

The support foreground's masked-average prototype is matched to the query by cosine similarity; the
positive point is the similarity argmax, the negative point the argmin. Then the cascaded post-refinement:
a second pass with the first mask's logits as mask input, a third with the box of the second mask plus
its logits (the third pass is what the caller decodes from the returned Prompts).

Adaptations, stated plainly:
- Box-trained backends (``backend.prefers_box``, e.g. LiteMedSAM) segment nothing from points alone, so
  the first pass also gets the box of the query region whose similarity passes half-way between the
  support's background and foreground levels around the positive point (PerSAM's own box comes from a
  mask, here from the similarity map), and the second pass the box of the first mask.
- Target-guided attention and target-semantic prompting act inside SAM's decoder; the backend interface
  (``SamBackend.decode``) has no hook for them, so they are not applied.
- ``presence`` is the calibrated similarity of the second mask (see ``features.presence_score``).
"""

from __future__ import annotations

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import mask_box
from . import features as F
from .refine import refine_with_mask_input


class PerSAM:
    """Prototype matching: argmax positive, argmin negative, two refinement passes."""

    name = "persam"

    def __init__(self, region_threshold: float = 0.5, presence_midpoint: float = 0.5, region: str = "level") -> None:
        self.region_threshold = float(region_threshold)
        self.region = region
        self.presence_midpoint = float(presence_midpoint)

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """Three-pass PerSAM prompts for one query slice."""
        S = backend.input_size
        summ = F.summarise_support(support.embedding, support.mask, context.valid)
        sim = F.cosine_similarity(query, summ.prototype)  # (h, w)
        valid_grid = F.mask_to_grid(context.valid, summ.grid) >= 0.5
        masked = np.where(valid_grid, sim, np.nan)
        pos_cell = np.unravel_index(np.nanargmax(masked), sim.shape)
        neg_cell = np.unravel_index(np.nanargmin(masked), sim.shape)
        pos = F.grid_to_model_points(np.array([pos_cell]), summ.grid, S)
        neg = F.grid_to_model_points(np.array([neg_cell]), summ.grid, S)

        box1 = None
        if backend.prefers_box:
            sim_model = F.upsample_to_model(sim, S)
            region = F.region_around(sim_model, F.coarse_threshold(sim_model, summ.levels, support.mask.sum(), context.valid,
                                                                  self.region, self.region_threshold), pos[0], context.valid)
            box1 = mask_box(region)
        first = backend.decode(query, Prompts(pos, neg, box1), multimask=box1 is None)
        return refine_with_mask_input(query, backend, context, summ, sim, pos, neg, first, self.presence_midpoint)

