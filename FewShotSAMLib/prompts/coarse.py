"""Coarse-mask prompts in the style of ProtoSAM (Ayzenberg et al., "ProtoSAM: One-Shot Medical Image
Segmentation With Foundational Models", 2024): a prototype-matching coarse mask turned into SAM prompts.

The query's cosine similarity to the support's masked-average prototype is thresholded (half-way between
the support's own background and foreground similarity levels) into a coarse mask. Each connected
component gives a prompt set: its bounding box, its most confident point and its centroid (when the
centroid lies inside the component). SAM takes one box per decode, so the component with the largest
similarity mass above the threshold is the one returned (the organ being one connected structure per
slice in the benchmarks). ``presence`` is the calibrated similarity of that component. One decode per
slice (the caller's).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import label_components, mask_box
from . import features as F


class CoarseMaskPrompts:
    """Thresholded prototype similarity -> box, most confident point and centroid per component."""

    name = "coarse"

    def __init__(self, threshold: float = 0.5, min_area: int = 16, presence_midpoint: float = 0.5,
                 region: str = "level") -> None:
        self.region = region
        self.threshold = float(threshold)
        self.min_area = int(min_area)
        self.presence_midpoint = float(presence_midpoint)

    def component_prompts(self, sim_model: np.ndarray, threshold: float,
                          valid: Optional[np.ndarray] = None) -> list[tuple[Prompts, np.ndarray, float]]:
        """One (Prompts, component mask, mass) per connected component of ``sim_model >= threshold``
        (model frame), largest similarity mass first; components smaller than ``min_area`` are dropped."""
        coarse = sim_model >= threshold
        if valid is not None:
            coarse &= np.asarray(valid, bool)
        labels, n = label_components(coarse)
        out = []
        for j in range(1, n + 1):
            comp = labels == j
            area = int(comp.sum())
            if area < self.min_area:
                continue
            vals = np.where(comp, sim_model, -np.inf)
            best = np.array(np.unravel_index(np.argmax(vals), vals.shape), np.float32)
            centroid = np.argwhere(comp).mean(0).astype(np.float32)
            pts = [best]
            ci = np.round(centroid).astype(int)
            if comp[ci[0], ci[1]] and np.abs(centroid - best).sum() > 1:
                pts.append(centroid)
            mass = float((sim_model[comp] - threshold).sum())
            out.append((Prompts(np.stack(pts), None, mask_box(comp)), comp, mass))
        out.sort(key=lambda t: -t[2])
        return out

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """Prompts of the most massive coarse component (empty prompts, presence 0, when there is none)."""
        S = backend.input_size
        summ = F.summarise_support(support.embedding, support.mask, context.valid)
        sim = F.cosine_similarity(query, summ.prototype)
        sim_model = F.upsample_to_model(sim, S)
        thr = F.coarse_threshold(sim_model, summ.levels, support.mask.sum(), context.valid, self.region, self.threshold)
        comps = self.component_prompts(sim_model, thr, context.valid)
        if not comps:
            return Prompts(presence=0.0)
        prompts, comp, _ = comps[0]
        prompts.presence = F.presence_score(summ.levels, sim, F.mask_to_grid(comp, summ.grid), self.presence_midpoint)
        return prompts
