"""P2SAM (Zhao et al., "Part-aware Prompted Segment Anything Model for Adaptive Segmentation"), training-free.

The support foreground features are clustered with k-means++ into ``n`` parts; each part's mean feature
is matched to the query and its similarity argmax is a positive point. The support background features
are clustered the same way and each background part's argmax is a negative point (medical images: the
backgrounds of support and query are the same anatomy). ``n`` runs over a small range and the candidate
whose query mask features are closest to the support foreground features by Wasserstein distance (POT's
exact EMD) is kept. Decoder passes: points (first), + mask input (second), + box + mask input (third,
decoded by the caller).

Adaptations, stated plainly:
- The retrieval compares the first-pass masks (one pass per candidate ``n``); the two refinement passes
  run only for the retrieved ``n``, to keep the cost at ``len(parts) + 2`` decodes per slice.
- A negative point is dropped when it falls on a cell more similar to the foreground prototype than to
  its own background part (it would contradict a positive), or on a positive cell.
- Box-trained backends get the box of the similarity region around the positive points in the first pass
  (see ``persam``); ``presence`` is the calibrated prototype similarity of the second mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import mask_box
from . import features as F
from .refine import refine_with_mask_input


class P2SAM:
    """Part-aware positive/negative points, Wasserstein retrieval of the number of parts."""

    name = "p2sam"

    def __init__(self, parts: Sequence[int] = (1, 2, 3), region_threshold: float = 0.5,
                 presence_midpoint: float = 0.5, seed: int = 0, region: str = "level") -> None:
        self.region = region
        self.parts = tuple(int(n) for n in parts)
        if not self.parts or min(self.parts) < 1:
            raise ValueError("parts must be positive integers")
        self.region_threshold = float(region_threshold)
        self.presence_midpoint = float(presence_midpoint)
        self.seed = int(seed)
        self._memo: dict = {}

    def part_prototypes(self, features: np.ndarray, n: int) -> np.ndarray:
        """(n', C) unit mean features of the k-means++ parts of ``features`` (n' <= n)."""
        cent, labels = F.kmeans_pp(features, n, seed=self.seed)
        protos = np.stack([features[labels == j].mean(0) for j in range(len(cent)) if (labels == j).any()])
        return protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-8)

    def _parts(self, summ: F.SupportSummary, n: int) -> tuple[np.ndarray, np.ndarray]:
        # keyed on the support's content (its prototype and feature counts), not on the summary object:
        # the same support slice met again (another query volume) is not clustered again
        key = (summ.prototype.tobytes(), len(summ.fg_features), len(summ.bg_features), n)
        if key not in self._memo:
            if len(self._memo) > 64:
                self._memo.clear()
            bg = self.part_prototypes(summ.bg_features, n) if len(summ.bg_features) else np.zeros((0, len(summ.prototype)))
            self._memo[key] = (self.part_prototypes(summ.fg_features, n), bg)
        return self._memo[key]

    def points(self, summ: F.SupportSummary, query, n: int, valid_grid: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Model-frame positive and negative points for ``n`` parts."""
        fg_p, bg_p = self._parts(summ, n)
        fg_sim = F.cosine_similarity(query, fg_p)
        proto_sim = F.cosine_similarity(query, summ.prototype)
        pos_cells = []
        for s in fg_sim:
            pos_cells.append(np.unravel_index(np.nanargmax(np.where(valid_grid, s, np.nan)), s.shape))
        neg_cells = []
        if len(bg_p):
            for s in F.cosine_similarity(query, bg_p):
                cell = np.unravel_index(np.nanargmax(np.where(valid_grid, s, np.nan)), s.shape)
                if cell in pos_cells or proto_sim[cell] >= s[cell]:
                    continue
                neg_cells.append(cell)
        pos = F.grid_to_model_points(np.array(sorted(set(pos_cells))), summ.grid, size)
        neg = F.grid_to_model_points(np.array(sorted(set(neg_cells))).reshape(-1, 2), summ.grid, size)
        return pos, neg

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """P2SAM prompts for one query slice (final pass left to the caller)."""
        S = backend.input_size
        summ = F.summarise_support(support.embedding, support.mask, context.valid)
        valid_grid = F.mask_to_grid(context.valid, summ.grid) >= 0.5
        sim = F.cosine_similarity(query, summ.prototype)
        sim_model = F.upsample_to_model(sim, S) if backend.prefers_box else None
        units = F.unit_features(query)
        best = None
        for n in self.parts:
            pos, neg = self.points(summ, query, n, valid_grid, S)
            box = None
            if backend.prefers_box:
                region = np.zeros((S, S), bool)
                thr = F.coarse_threshold(sim_model, summ.levels, support.mask.sum(), context.valid, self.region,
                                         self.region_threshold)
                for p in pos:
                    region |= F.region_around(sim_model, thr, p, context.valid)
                box = mask_box(region)
            res = backend.decode(query, Prompts(pos, neg, box), multimask=box is None)
            mask = res.mask & context.valid
            cells = F.mask_to_grid(mask, summ.grid) >= 0.5
            dist = F.wasserstein(summ.fg_features, units[cells.reshape(-1)], seed=self.seed)
            if best is None or dist < best[0]:
                best = (dist, n, pos, neg, res, mask)
        _, _, pos, neg, first, _ = best
        return refine_with_mask_input(query, backend, context, summ, sim, pos, neg, first, self.presence_midpoint)
