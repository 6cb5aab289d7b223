"""Simulated corrective clicks, as in the interactive-segmentation literature (SAM's interactive training,
RITM's click simulation): one click at the most interior pixel of the largest error region, a foreground
point where the target was missed and a background point where the answer leaked; and the Dice that
judges the answers (also the evaluation harness's).

Used by the click benchmark (``evaluate --protocol clicks``) and by the training of the point-aware
LiteMedSAM decoder (tools/fewshotsam_lab/point_decoder.py), so that both simulate the same user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Click:
    """One click: ``point`` (row, col) in the mask's pixel grid; ``foreground`` True for a foreground point."""

    point: tuple[int, int]
    foreground: bool


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """The pixel of ``region`` (bool, 2D, not empty) farthest from its outside (the image border counts as
    outside); the first such pixel in row-major order when several tie."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def corrective_click(prediction: np.ndarray, truth: np.ndarray, valid: Optional[np.ndarray] = None
                     ) -> Optional[Click]:
    """The click a user makes to correct ``prediction`` towards ``truth`` (bool 2D arrays of one shape):
    at the most interior pixel of the largest connected error region (4-connected), foreground where the
    region was missed, background where it was added. None when the prediction is already exact (inside
    ``valid`` when given)."""
    prediction = np.asarray(prediction, bool)
    truth = np.asarray(truth, bool)
    missed = truth & ~prediction
    added = prediction & ~truth
    if valid is not None:
        missed &= valid
        added &= valid
    best: Optional[tuple[int, np.ndarray, bool]] = None
    for errors, foreground in ((missed, True), (added, False)):
        if not errors.any():
            continue
        labels, n = ndimage.label(errors)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labels == k, foreground)
    if best is None:
        return None
    return Click(interior_point(best[1]), best[2])


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice in percent of two bool arrays; 100 when both are empty."""
    p, t = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = int(p.sum()) + int(t.sum())
    return 100.0 if total == 0 else 200.0 * int((p & t).sum()) / total


def clicks_to_reach(dice_per_round: Sequence[float], threshold: float) -> Optional[int]:
    """NoC: the number of corrective clicks after which Dice first reaches ``threshold`` (round 0 is the
    automatic answer, needing 0 clicks); None when no round reaches it."""
    for clicks, d in enumerate(dice_per_round):
        if d >= threshold:
            return clicks
    return None
