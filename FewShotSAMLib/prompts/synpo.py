"""SynPo (Liu et al., "SynPo: Boosting Training-Free Few-Shot Medical Segmentation via High-Quality
Negative Prompts"), with SAM features only (DINOv2 weights are not obtainable here, so the confidence
map is the SAM branch of the synergy map).

- Confidence map: for every query cell, the mean cosine similarity to the support's foreground cells.
- Negative confidence distribution: the same map computed on the support's own background cells; a
  Gaussian (maximum likelihood: mean, std) is fitted to it.
- Positives: the top ``gamma_pos * k_pos`` confidence cells, clustered by k-means on their coordinates;
  the ``k_pos`` centroids are the positive points.
- Negatives: the query cells whose confidence lies in ``[mu - alpha*sigma, mu - beta*sigma]`` ("less, not
  least, similar"), at most ``gamma_neg * k_neg`` of them drawn at random (fixed seed), clustered by
  k-means into ``k_neg`` centroids. Defaults alpha = 0, beta = -1.5: the band [mu, mu + 1.5 sigma], the
  paper's best on CHAOS.
- Noise-aware refinement: the first mask is opened (erosion then dilation), the connected component with
  the highest mean confidence is kept and fed back as mask input with the points; the second output is
  refined the same way and the final prompts (decoded by the caller) carry the refined mask as mask
  input.

Adaptations: box-trained backends (LiteMedSAM) also get a box in every pass: the similarity region
around the positive points in the first pass, the refined mask's box afterwards. ``presence`` is the
calibrated confidence of the refined mask.
"""

from __future__ import annotations

import numpy as np

from ..prompt_types import Prompts, QueryContext, Support
from ..shape import mask_box
from . import features as F


class SynPo:
    """Confidence-band negatives, k-means positives, noise-aware two-pass refinement."""

    name = "synpo"

    def __init__(self, k_pos: int = 3, k_neg: int = 5, gamma_pos: int = 10, gamma_neg: int = 10,
                 alpha: float = 0.0, beta: float = -1.5, opening_radius: int = 2, region_threshold: float = 0.5,
                 presence_midpoint: float = 0.5, seed: int = 0, region: str = "level") -> None:
        self.region = region
        if alpha < beta:
            raise ValueError("alpha must be >= beta so that [mu - alpha*sigma, mu - beta*sigma] is an interval")
        self.k_pos, self.k_neg = int(k_pos), int(k_neg)
        self.gamma_pos, self.gamma_neg = int(gamma_pos), int(gamma_neg)
        self.alpha, self.beta = float(alpha), float(beta)
        self.opening_radius = int(opening_radius)
        self.region_threshold = float(region_threshold)
        self.presence_midpoint = float(presence_midpoint)
        self.seed = int(seed)

    @staticmethod
    def confidence(summ: F.SupportSummary, embedding) -> np.ndarray:
        """(h, w) mean cosine similarity of each cell of ``embedding`` to the support's foreground cells."""
        mean_fg = summ.fg_features.mean(0)  # mean of cosines = dot with the mean of unit vectors
        units = F.unit_features(embedding)
        e_shape = embedding.shape
        return (units @ mean_fg).reshape(e_shape[1], e_shape[2])

    def negative_band(self, summ: F.SupportSummary, support_embedding) -> tuple[float, float]:
        """(low, high) confidence band of the negatives from the Gaussian of the support background."""
        conf = self.confidence(summ, support_embedding)[summ.bg_cells]
        mu, sigma = float(conf.mean()), float(conf.std())
        return mu - self.alpha * sigma, mu - self.beta * sigma

    def negative_candidates(self, conf: np.ndarray, low: float, high: float, valid_grid: np.ndarray) -> np.ndarray:
        """(M, 2) grid cells whose confidence lies in [low, high], at most gamma_neg * k_neg drawn at random
        (fixed seed)."""
        band_rc = np.argwhere(valid_grid & (conf >= low) & (conf <= high)).astype(np.float64)
        cap = self.gamma_neg * self.k_neg
        if len(band_rc) > cap:
            rng = np.random.default_rng(self.seed)
            band_rc = band_rc[np.sort(rng.choice(len(band_rc), cap, replace=False))]
        return band_rc

    def points(self, summ: F.SupportSummary, support_embedding, conf: np.ndarray, valid_grid: np.ndarray,
               size: int) -> tuple[np.ndarray, np.ndarray]:
        """Model-frame positive and negative points from a query confidence map ``conf`` (h, w)."""
        flat = np.where(valid_grid, conf, -np.inf).reshape(-1)
        n_top = max(self.k_pos, min(int(valid_grid.sum()), self.gamma_pos * self.k_pos))
        top = np.argsort(-flat, kind="stable")[:n_top]
        top_rc = np.stack(np.unravel_index(top, conf.shape), 1).astype(np.float64)
        pos_c, _ = F.kmeans_pp(top_rc, self.k_pos, seed=self.seed)
        lo, hi = self.negative_band(summ, support_embedding)
        band_rc = self.negative_candidates(conf, lo, hi, valid_grid)
        neg_c = np.zeros((0, 2))
        if len(band_rc):
            neg_c, _ = F.kmeans_pp(band_rc, self.k_neg, seed=self.seed)
        return F.grid_to_model_points(pos_c, summ.grid, size), F.grid_to_model_points(neg_c, summ.grid, size)

    def refine(self, mask: np.ndarray, conf_model: np.ndarray) -> np.ndarray:
        """Noise-aware refinement: opening, then the component with the highest mean confidence."""
        opened = F.opening(mask, self.opening_radius)
        if not opened.any():
            opened = mask
        return F.best_component(opened, conf_model)

    def generate(self, support: Support, query, context: QueryContext, backend) -> Prompts:
        """SynPo prompts for one query slice (final pass left to the caller)."""
        S = backend.input_size
        summ = F.summarise_support(support.embedding, support.mask, context.valid)
        valid_grid = F.mask_to_grid(context.valid, summ.grid) >= 0.5
        conf = self.confidence(summ, query)
        conf_model = F.upsample_to_model(conf, S)
        pos, neg = self.points(summ, support.embedding, conf, valid_grid, S)
        box = None
        if backend.prefers_box:
            s_conf = self.confidence(summ, support.embedding)
            levels = F.SimilarityLevels.from_support(s_conf, summ.weights, valid_grid)
            region = np.zeros((S, S), bool)
            thr = F.coarse_threshold(conf_model, levels, support.mask.sum(), context.valid, self.region,
                                     self.region_threshold)
            for p in pos:
                region |= F.region_around(conf_model, thr, p, context.valid)
            box = mask_box(region)
        first = backend.decode(query, Prompts(pos, neg, box), multimask=box is None)
        refined = self.refine(first.mask & context.valid, conf_model)
        for _ in range(1):  # the second pass of the noise-aware refinement
            if not refined.any():
                break
            res = backend.decode(query, Prompts(pos, neg, mask_box(refined) if backend.prefers_box else None,
                                                mask_input=F.mask_to_low_res(refined, first.low_res)),
                                 multimask=not backend.prefers_box)
            again = self.refine(res.mask & context.valid, conf_model)
            if again.any():
                refined, first = again, res
        s_conf = self.confidence(summ, support.embedding)
        levels = F.SimilarityLevels.from_support(s_conf, summ.weights, valid_grid)
        presence = F.presence_score(levels, conf, F.mask_to_grid(refined, summ.grid), self.presence_midpoint)
        if not refined.any():
            return Prompts(pos, neg, box, presence=presence)
        return Prompts(pos, neg, mask_box(refined), presence=presence,
                       mask_input=F.mask_to_low_res(refined, first.low_res))
