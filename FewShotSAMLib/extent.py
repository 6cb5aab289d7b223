"""Where the target ends: the automatic extent of a propagation run.

Outward from a painted slice, the engine keeps segmenting while each new slice's answer passes
:func:`accept_slice` (SAM's score, the generator's presence unless the answer narrows inside the
neighbour's, the area and the overlap with the neighbouring slice's answer, under :class:`ExtentRules`)
and :class:`TargetEvidence` still says the mask looks like the painted target rather than the tissue
around it. The first slice that fails is dropped
and the run stops. A forced range (``resolve_extent``) switches these tests off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .errors import UserInputError
from .prompts.base import Support

Extent = Union[str, tuple[int, int]]


@dataclass
class ExtentRules:
    """When automatic extent stops propagating outward from the painted slice (first failing slice is
    dropped). Areas are fractions of the support mask's area."""

    min_presence: float = 0.5
    min_area_fraction: float = 0.03
    max_area_growth: float = 2.5  # vs the neighbour's area
    min_overlap: float = 0.3  # |mask & neighbour| / |mask|
    min_score: float = 0.3
    min_evidence: float = 0.0  # cos(mask features, target prototype) - cos(mask features, ring prototype)
    ring: tuple[int, int] = (3, 12)  # inner/outer dilation (model-frame pixels at 256) of the support ring
    # A low presence does not end the target where the answer narrows inside the neighbour's (an organ's tip):
    # smaller than tip_shrink of the neighbour's area with at least tip_nest of it inside the neighbour's answer.
    # CHAOS, FoB's propagation, 20 volumes: missed slices 2.09 -> 1.06 per target (docs/FOB.md).
    tip_shrink: float = 0.9
    tip_nest: float = 0.8


def resolve_extent(extent: Optional[Extent], n_slices: int) -> tuple[int, int, bool]:
    """(first, last, forced) slices of a run: 'auto' (or None) is every slice, not forced; (z0, z1) is
    that inclusive range, forced (the extent tests are off)."""
    if extent == "auto" or extent is None:
        return 0, n_slices - 1, False
    lo, hi = int(extent[0]), int(extent[1])
    if not (0 <= lo <= hi < n_slices):
        raise UserInputError(
            f"The slice range {lo}:{hi} is outside the volume, which has slices 0 to {n_slices - 1} along the "
            f"slicing axis; pick a range inside it.")
    return lo, hi, True


def narrows_inside(mask: np.ndarray, neighbour: Optional[np.ndarray], rules: ExtentRules) -> bool:
    """Is ``mask`` the target narrowing towards its end: smaller than the ``neighbour`` slice's answer and
    (mostly) inside it, as at an organ's tip? A generator's presence, judged on the neighbour's answer,
    often says 'absent' there while the target goes on."""
    area = int(mask.sum())
    if neighbour is None or area == 0 or not neighbour.any():
        return False
    return area < rules.tip_shrink * int(neighbour.sum()) and (mask & neighbour).sum() >= rules.tip_nest * area


def accept_slice(mask: np.ndarray, score: float, presence: float, neighbour: Optional[np.ndarray],
                 support: np.ndarray, rules: ExtentRules) -> bool:
    """Does the answer ``mask`` (model frame) on a query slice continue the target? SAM's ``score`` and
    the generator's ``presence`` high enough (a low presence is overruled where the answer narrows inside
    the neighbour's, :func:`narrows_inside`), an area that neither vanished (vs the ``support`` mask) nor
    exploded (vs the ``neighbour`` slice's mask), and enough overlap with the neighbour."""
    area = int(mask.sum())
    if score < rules.min_score or (presence < rules.min_presence and not narrows_inside(mask, neighbour, rules)):
        return False
    if area < max(4, rules.min_area_fraction * int(support.sum())):
        return False
    if neighbour is not None and neighbour.any():
        if area > rules.max_area_growth * neighbour.sum():
            return False
        if (mask & neighbour).sum() / area < rules.min_overlap:
            return False
    return True


def _pool(embedding, mask: np.ndarray) -> np.ndarray:
    """Mean embedding vector (C,) under a model-frame mask, area-weighted on the embedding grid."""
    from .prompts import features

    weights = features.mask_to_grid(mask, embedding.shape[-2:])
    return features.masked_prototype(embedding, weights, normalise=False)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-8))


class TargetEvidence:
    """Does a predicted query mask look like the support's target or like the ring of tissue around it?

    Prototypes are the support embedding pooled under the target and under a ring just outside it;
    ``score(query_embedding, mask)`` is cos(mask mean, target) - cos(mask mean, ring): positive when the
    mask holds the target, negative when propagation has drifted onto the surroundings.
    """

    def __init__(self, support: Support, ring: tuple[int, int], input_size: int) -> None:
        from scipy import ndimage

        scale = input_size / 256.0
        inner = ndimage.binary_dilation(support.mask, iterations=max(1, int(round(ring[0] * scale))))
        outer = ndimage.binary_dilation(support.mask, iterations=max(2, int(round(ring[1] * scale))))
        self.target = _pool(support.embedding, support.mask)
        self.ring = _pool(support.embedding, outer & ~inner)

    def score(self, embedding, mask: np.ndarray) -> float:
        """Evidence in [-2, 2] that ``mask`` on ``embedding`` is the target."""
        if not mask.any():
            return -2.0
        f = _pool(embedding, mask)
        return _cos(f, self.target) - _cos(f, self.ring)
