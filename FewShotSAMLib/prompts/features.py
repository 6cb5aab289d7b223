"""Shared feature helpers of the prompt generators (the one place for them; about 400 lines because every
generator's arithmetic on embeddings lives here once instead of in five copies, and the helpers build
on each other: grid <-> model frame, prototypes, similarity levels, thresholds, regions).

Everything works on a SAM embedding ``(C, h, w)`` (a torch tensor or numpy array) and on masks in the
*model frame* ``(S, S)`` (see ``prompts.base``). Grid cell ``(i, j)`` of the embedding covers model-frame
pixels ``[i*S/h, (i+1)*S/h)``; its centre is at model-frame ``(i + 0.5) * S / h - 0.5``.

Helpers:
- :func:`mask_to_grid` / :func:`grid_to_model_points` / :func:`upsample_to_model`: model frame <-> grid.
- :func:`unit_features`, :func:`masked_prototype`, :func:`cosine_similarity`: prototypes and similarity maps.
- :func:`kmeans_pp`: seeded k-means with k-means++ initialisation (numpy, deterministic).
- :func:`spread_points`: the best-scoring points at least a given distance apart.
- :func:`ring`: the band around a mask (for background sampling near the target).
- :func:`opening`, :func:`mask_to_low_res`, :func:`best_component`: mask post-processing for multi-pass
  generators (connected components: ``shape.label_components``).
- :class:`SimilarityLevels` and :func:`presence_score`: a calibrated presence from similarity statistics.
- :func:`wasserstein`: distance between two feature sets (POT's exact EMD).
- :func:`summarise_support` (memoised per support), :func:`coarse_threshold` / :func:`region_around`: the
  similarity region around a seed point whose box prompts box-trained backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..shape import label_components


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Model frame <-> embedding grid
# ----------------------------------------------------------------------------------------------------
def mask_to_grid(mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Fraction (0..1) of each embedding-grid cell covered by a model-frame bool mask (area average).

    ``mask`` is (S, S) with S a multiple of the grid size; returns float32 (h, w).
    """
    m = np.asarray(mask, dtype=np.float32)
    h, w = int(grid[0]), int(grid[1])
    S0, S1 = m.shape
    if S0 % h or S1 % w:
        import cv2

        return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return m.reshape(h, S0 // h, w, S1 // w).mean(axis=(1, 3)).astype(np.float32)


def grid_to_model_points(cells: np.ndarray, grid: Sequence[int], size: int) -> np.ndarray:
    """(N, 2) grid (row, col) positions (integers or fractional) -> (N, 2) model-frame (row, col) float32."""
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    fr, fc = size / float(grid[0]), size / float(grid[1])
    return np.stack([(cells[:, 0] + 0.5) * fr - 0.5, (cells[:, 1] + 0.5) * fc - 0.5], 1).astype(np.float32)


def upsample_to_model(grid_map: np.ndarray, size: int) -> np.ndarray:
    """(h, w) map on the embedding grid -> (S, S) model-frame map, bilinear with aligned pixel centres."""
    t = torch.as_tensor(np.asarray(grid_map, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


# ----------------------------------------------------------------------------------------------------
# Prototypes and similarity
# ----------------------------------------------------------------------------------------------------
_UNIT_MEMO: list = []  # (embedding object, its unit features) of the last few embeddings seen


def unit_features(embedding) -> np.ndarray:
    """(C, h, w) embedding -> (h*w, C) float32 rows of unit L2 norm (row-major over the grid).

    The generators ask for the same query and support embeddings several times per slice; the answer
    for the last few embedding objects is kept (embeddings are never modified in place). Callers must
    not modify the returned array."""
    for obj, units in _UNIT_MEMO:
        if obj is embedding:
            return units
    e = _as_numpy(embedding)
    f = e.reshape(e.shape[0], -1).T
    units = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
    units.setflags(write=False)
    _UNIT_MEMO.insert(0, (embedding, units))
    del _UNIT_MEMO[4:]
    return units


def masked_prototype(embedding, weights: np.ndarray, normalise: bool = True) -> np.ndarray:
    """Masked average pooling: the ``weights``-weighted mean (C,) of the embedding's cells.

    ``weights`` is (h, w), e.g. :func:`mask_to_grid` of the support mask. With ``normalise`` the cells are
    unit-normalised first and the result too (the prototype of cosine matching).
    """
    w = np.asarray(weights, np.float32).reshape(-1)
    if w.sum() <= 0:
        raise ValueError("masked_prototype needs a non-empty mask")
    f = unit_features(embedding) if normalise else _as_numpy(embedding).reshape(_as_numpy(embedding).shape[0], -1).T
    p = (f * w[:, None]).sum(0) / w.sum()
    if normalise:
        p = p / max(float(np.linalg.norm(p)), 1e-8)
    return p.astype(np.float32)


def cosine_similarity(embedding, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity of every grid cell to each prototype: (K, h, w) for (K, C) prototypes, (h, w) for (C,)."""
    e_shape = embedding.shape
    p = np.asarray(prototypes, np.float32)
    single = p.ndim == 1
    p = p.reshape(-1, e_shape[0])
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-8)
    sim = (unit_features(embedding) @ p.T).T.reshape(len(p), e_shape[1], e_shape[2])
    return sim[0] if single else sim


# ----------------------------------------------------------------------------------------------------
# Clustering and point selection
# ----------------------------------------------------------------------------------------------------
def kmeans_pp(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), deterministic for a given ``seed``.

    ``x`` is (N, D); returns (centroids (k', D), labels (N,)) with k' = min(k, number of distinct rows).
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("kmeans_pp needs at least one sample")
    k = int(max(1, min(k, len(np.unique(x, axis=0)))))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centres)
    labels = np.zeros(n, np.int64)
    for it in range(iters):
        dist = ((x[:, None, :] - c[None]) ** 2).sum(-1) if n * k * x.shape[1] < 5e7 else _chunked_dist(x, c)
        new = dist.argmin(1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            sel = labels == j
            if sel.any():
                c[j] = x[sel].mean(0)
    return c.astype(np.float32), labels


def _chunked_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None]


def spread_points(score: np.ndarray, n: int, min_distance: float, candidates: Optional[np.ndarray] = None,
                  lowest: bool = False) -> np.ndarray:
    """Up to ``n`` (row, col) positions of the highest (or ``lowest``) ``score`` values, pairwise at least
    ``min_distance`` apart (greedy non-maximum suppression), restricted to ``candidates`` (bool) if given."""
    s = np.asarray(score, np.float64)
    s = -s if lowest else s.copy()
    if candidates is not None:
        s = np.where(candidates, s, -np.inf)
    order = np.argsort(-s, axis=None, kind="stable")
    picked: list[tuple[int, int]] = []
    for flat in order:
        if not np.isfinite(s.flat[flat]) or len(picked) >= n:
            break
        r, c = divmod(int(flat), s.shape[1])
        if all((r - pr) ** 2 + (c - pc) ** 2 >= min_distance ** 2 for pr, pc in picked):
            picked.append((r, c))
    return np.asarray(picked, np.float32).reshape(-1, 2)


def ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels at a chessboard distance in (inner, outer] from ``mask``: the band just outside it."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros_like(m)
    st = np.ones((3, 3), bool)
    out = ndimage.binary_dilation(m, st, iterations=int(outer)) if outer > 0 else m
    inn = ndimage.binary_dilation(m, st, iterations=int(inner)) if inner > 0 else m
    return out & ~inn


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------
def opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening (erosion then dilation) with a (2r+1)^2 square; removes specks thinner than it."""
    from scipy import ndimage

    if radius <= 0:
        return np.asarray(mask, bool)
    st = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    return ndimage.binary_opening(np.asarray(mask, bool), st)


def mask_to_low_res(mask: np.ndarray, low_res: Optional[np.ndarray] = None, size: int = 256,
                    outside: float = -8.0, inside: float = 8.0) -> np.ndarray:
    """A (size, size) low-resolution logit map for SAM's mask input from a model-frame bool mask.

    With ``low_res`` (the decoder's own logits) the logits are kept inside the mask and set to ``outside``
    elsewhere; without it the mask becomes +/- constants.
    """
    m = np.asarray(mask, np.float32)
    if m.shape != (size, size):
        m = mask_to_grid(m, (size, size)) if m.shape[0] % size == 0 else upsample_to_model(m, size)
    keep = m >= 0.5
    if low_res is None:
        return np.where(keep, inside, outside).astype(np.float32)
    return np.where(keep, np.asarray(low_res, np.float32), outside).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Presence
# ----------------------------------------------------------------------------------------------------
@dataclass
class SimilarityLevels:
    """Where the support's own cells fall on a similarity map: mean over the foreground and over the
    valid background. A query region is scored by where its mean similarity falls between the two."""

    foreground: float
    background: float

    @classmethod
    def from_support(cls, sim: np.ndarray, fg_weights: np.ndarray, valid_grid: Optional[np.ndarray] = None,
                     ) -> "SimilarityLevels":
        """Levels of a support similarity map ``sim`` (h, w) given the support's grid mask weights."""
        w = np.asarray(fg_weights, np.float32)
        fg = w >= 0.5
        if not fg.any():
            fg = w > 0
        bg = w <= 0.0
        if valid_grid is not None:
            bg &= np.asarray(valid_grid, bool)
        fg_level = float(sim[fg].mean()) if fg.any() else float(sim.max())
        bg_level = float(sim[bg].mean()) if bg.any() else float(sim.min())
        return cls(fg_level, bg_level)

    def relative(self, value: float) -> float:
        """0 at the background level, 1 at the foreground level (unclipped)."""
        span = max(self.foreground - self.background, 1e-6)
        return (float(value) - self.background) / span


def presence_score(levels: SimilarityLevels, sim: np.ndarray, region: np.ndarray, midpoint: float = 0.5,
                   steepness: float = 10.0) -> float:
    """Calibrated presence (0..1) of the target in ``region`` (grid bool or weights) of a query map ``sim``.

    The region's mean similarity is placed on the support's scale (0 = background level, 1 = foreground
    level) and passed through a logistic centred at ``midpoint``: a region that looks like the support's
    foreground scores near 1, one that looks like its background near 0, an empty region 0.
    """
    r = np.asarray(region, np.float32)
    if r.sum() <= 0:
        return 0.0
    mean = float((sim * r).sum() / r.sum())
    t = levels.relative(mean)
    return float(1.0 / (1.0 + np.exp(-steepness * (t - midpoint))))


# ----------------------------------------------------------------------------------------------------
# Distribution distance
# ----------------------------------------------------------------------------------------------------
def wasserstein(a: np.ndarray, b: np.ndarray, max_samples: int = 400, seed: int = 0) -> float:
    """Exact earth mover's distance between the uniform empirical distributions of feature rows ``a`` and
    ``b`` (Euclidean ground cost), each subsampled to ``max_samples`` rows with a fixed seed; inf if empty."""
    import ot

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("inf")
    rng = np.random.default_rng(seed)
    if len(a) > max_samples:
        a = a[np.sort(rng.choice(len(a), max_samples, replace=False))]
    if len(b) > max_samples:
        b = b[np.sort(rng.choice(len(b), max_samples, replace=False))]
    cost = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b)), cost))


# ----------------------------------------------------------------------------------------------------
# Support summaries and coarse regions (shared by the matching generators)
# ----------------------------------------------------------------------------------------------------
@dataclass
class SupportSummary:
    """What matching generators derive from one support slice (computed once per support)."""

    grid: tuple[int, int]
    weights: np.ndarray  # (h, w) fraction of each cell inside the support mask
    fg_cells: np.ndarray  # (h, w) bool, weights >= 0.5 (or > 0 for a tiny mask)
    bg_cells: np.ndarray  # (h, w) bool, weights == 0 and inside the valid image
    fg_features: np.ndarray  # (n_fg, C) unit features of the foreground cells
    bg_features: np.ndarray  # (n_bg, C) unit features of the background cells
    prototype: np.ndarray  # (C,) unit masked-average prototype
    levels: SimilarityLevels  # prototype similarity levels on the support itself


_SUMMARY_MEMO: dict = {}


def summarise_support(embedding, mask: np.ndarray, valid: Optional[np.ndarray] = None) -> SupportSummary:
    """Grid mask, foreground/background unit features, prototype and similarity levels of a support.

    ``mask`` and ``valid`` are model-frame (S, S) bools. Results are memoised on the embedding object and
    the mask's content, so calling this for every query slice of the same support costs nothing.
    """
    e = _as_numpy(embedding) if not torch.is_tensor(embedding) else embedding
    mask = np.asarray(mask, bool)
    key = (id(embedding), mask.shape, hash(np.packbits(mask).tobytes()),
           None if valid is None else hash(np.packbits(np.asarray(valid, bool)).tobytes()))
    hit = _SUMMARY_MEMO.get(key)
    if hit is not None and hit[0] is embedding:
        return hit[1]
    arr = _as_numpy(e)
    grid = (arr.shape[1], arr.shape[2])
    weights = mask_to_grid(mask, grid)
    if weights.sum() <= 0:
        raise ValueError("the support mask is empty")
    fg = weights >= 0.5
    if not fg.any():
        fg = weights > 0
    valid_grid = np.ones(grid, bool) if valid is None else mask_to_grid(valid, grid) >= 0.5
    bg = (weights <= 0) & valid_grid
    units = unit_features(arr)
    proto = masked_prototype(arr, weights)
    sim = cosine_similarity(arr, proto)
    summary = SupportSummary(grid, weights, fg, bg, units[fg.reshape(-1)], units[bg.reshape(-1)], proto,
                             SimilarityLevels.from_support(sim, weights, valid_grid))
    if len(_SUMMARY_MEMO) > 32:
        _SUMMARY_MEMO.clear()
    _SUMMARY_MEMO[key] = (embedding, summary)
    return summary


def threshold_level(levels: SimilarityLevels, relative: float) -> float:
    """The similarity value ``relative`` of the way from the background level to the foreground level."""
    return levels.background + relative * (levels.foreground - levels.background)


def region_around(sim_model: np.ndarray, threshold: float, seed: Optional[np.ndarray] = None,
                  valid: Optional[np.ndarray] = None) -> np.ndarray:
    """The connected region of ``sim_model >= threshold`` (model frame) holding ``seed`` (row, col); without
    a seed, or when the seed is outside every region, the region with the largest similarity mass above
    the threshold. Empty when nothing passes the threshold."""
    above = np.asarray(sim_model) >= threshold
    if valid is not None:
        above &= np.asarray(valid, bool)
    labels, n = label_components(above)
    if n == 0:
        return above
    if seed is not None:
        r, c = int(round(float(seed[0]))), int(round(float(seed[1])))
        if 0 <= r < labels.shape[0] and 0 <= c < labels.shape[1] and labels[r, c] > 0:
            return labels == labels[r, c]
    mass = np.bincount(labels.reshape(-1), weights=(np.asarray(sim_model) - threshold).reshape(-1) * above.reshape(-1),
                       minlength=n + 1)
    mass[0] = -np.inf
    return labels == int(np.argmax(mass))


def best_component(mask: np.ndarray, score_model: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` with the highest mean ``score_model`` (SynPo's rule); empty mask
    stays empty."""
    labels, n = label_components(mask)
    if n <= 1:
        return np.asarray(mask, bool)
    sums = np.bincount(labels.reshape(-1), weights=np.asarray(score_model, np.float64).reshape(-1), minlength=n + 1)
    counts = np.bincount(labels.reshape(-1), minlength=n + 1)
    means = sums[1:] / np.maximum(counts[1:], 1)
    return labels == int(np.argmax(means)) + 1


def area_threshold(sim_model: np.ndarray, area: float, valid: Optional[np.ndarray] = None) -> float:
    """The similarity value above which ``area`` pixels of ``sim_model`` lie (inside ``valid``): the
    threshold that gives a coarse region the support mask's size (a size prior from the support)."""
    vals = np.asarray(sim_model)[np.asarray(valid, bool)] if valid is not None else np.asarray(sim_model).reshape(-1)
    k = int(np.clip(round(area), 1, vals.size))
    return float(np.partition(vals, vals.size - k)[vals.size - k])


REGION_RULES = ("area", "level")


def coarse_threshold(sim_model: np.ndarray, levels: SimilarityLevels, support_area: float,
                     valid: Optional[np.ndarray] = None, rule: str = "area", relative: float = 0.5) -> float:
    """Threshold of a query similarity map into a coarse target region.

    ``rule="area"``: the value above which as many pixels lie as the support mask has (``area_threshold``),
    never below the half-way ``level``; ``rule="level"``: ``relative`` of the way from the support's
    background to its foreground similarity level (``threshold_level``).
    """
    level = threshold_level(levels, relative)
    if rule == "level":
        return level
    if rule == "area":
        return max(level, area_threshold(sim_model, support_area, valid))
    raise ValueError(f"unknown region rule {rule!r}; use one of {REGION_RULES}")
