"""Corrective re-runs: what a click changes on a slice whose answer the user is correcting.

``changes_at_points`` keeps the previous answer except the regions SAM's new answer adds at a foreground
point or removes at a background point; ``tissue_like_clicks`` (the tissue that looks like a click,
``region_like``) and ``clear_around`` (a background click SAM ignores) are what a click does beyond SAM's
answer; ``previous_answer_of_piece`` is the part of a slice's previous answer that belongs to one piece's
prompts (its mask input when a target is in pieces); ``within_nearby`` bounds the answer to a click on a
slice without one by the nearest answered slice's (``nearest_answer``). The engine
(``VolumeSession.corrected_slice``, ``with_previous_answer``) and the Slicer module use them."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from .prompt_types import Prompts
from .shape import label_components, pixels_inside


# A click's change reaches this many times the click's distance to the edge of the answer it corrects
# (a click at the middle of an error region sits about its half-width from that edge). Chosen on the click
# benchmark's fold-0 volumes (1, 2, 3, 5, 8; FoB start, three rounds): none +2.79, 2 +3.39, 3 +3.45, 4 +3.42.
CLICK_SPREAD = 3.0


# A background click that SAM's re-run does not follow clears a disk around it: this many times the click's
# distance to the answer's edge, at most CLEAR_CAP x the equivalent radius of the answer's part it is in.
# Chosen on the click benchmark's fold-0 volumes (FoB start, spread 3, three rounds): 1x 93.61, 1.5x 93.99
# uncapped, 1.5x with the cap 93.61 (the cap keeps a click in a hole SAM filled from clearing half an organ).
CLEAR_RADIUS = 1.5
CLEAR_CAP = 0.5

# A click also takes the tissue that looks like it: the pixels connected to it whose intensity (the
# slice normalised to [0, 1] by the session's window) is within LIKE_TOLERANCE of the click's (the median
# of its 5 x 5 neighbourhood), up to LIKE_RADIUS x its distance to the previous answer's edge; a foreground
# click outside the answer adds them, a background click inside it removes them (a homogeneous blob past
# the target's end goes, a click in a hole SAM filled clears the hole's own tissue, not the organ around
# it). Chosen on the click benchmark's fold-0 volumes (FoB's start, three rounds; docs/POINTS.md): tolerance
# 0.1 / 0.2 / 0.3 for background clicks SAM ignores 94.09 / 94.20 / 94.23, foreground reach 1x / 1.5x / 3x
# 94.60 / 94.62 / 94.06, both directions always 94.77 (93.90 without the rule).
LIKE_TOLERANCE = 0.2
LIKE_RADIUS = 1.5

# A click on a slice without an answer (one past the automatic extent) keeps SAM's answer only within the
# nearest answered slice's answer, however far, grown by NEARBY_REACH x its equivalent radius (at least
# 3 px): to a point alone MobileSAM answers with far more than the organ. Chosen on the click benchmark's
# fold-0 volumes (docs/POINTS.md).
NEARBY_REACH = 0.05


def changes_at_points(previous: np.ndarray, new: np.ndarray, fg: np.ndarray, bg: np.ndarray,
                      reach: float = 2.0, spread: Optional[float] = None) -> np.ndarray:
    """A corrected slice: ``previous`` with only the changes of ``new`` that its points ask for: each
    connected region that ``new`` adds is taken when it holds a foreground point (or passes within
    ``reach`` px of one), each region it removes when it holds a background point. A click then changes
    the answer where it was placed and in its own direction, and SAM re-deciding the rest of the slice
    never undoes an earlier correction. With ``spread`` a region is taken only within ``spread`` times
    each point's distance to the previous answer's edge around it (at least ``reach``), so that a click
    does not carry a leak or a cut far from where it was placed. ``fg``, ``bg``: (N, 2) rows, cols."""
    previous, new = np.asarray(previous, bool), np.asarray(new, bool)
    out = previous.copy()
    for region, points, value in ((new & ~previous, fg, True), (previous & ~new, bg, False)):
        if not region.any() or not len(points):
            continue
        labels, _ = label_components(region)
        at = np.zeros(region.shape, bool)
        rc = pixels_inside(points, region.shape)
        at[rc[:, 0], rc[:, 1]] = True
        near = ndimage.distance_transform_edt(~at) <= reach
        keep = np.unique(labels[near & region])
        taken = np.isin(labels, keep[keep > 0])
        if spread is not None and len(rc) and (previous != value).any() and (previous == value).any():
            # each point's change stays within spread x its distance to the previous answer's edge
            edge = ndimage.distance_transform_edt(previous != value)
            disks = np.zeros(region.shape, bool)
            for r, c in rc:
                disks |= _disk(region.shape, r, c, max(reach, spread * float(edge[r, c])))
            taken &= disks
        out[taken] = value
    return out


def previous_answer_of_piece(previous: np.ndarray, prompts: Prompts) -> np.ndarray:
    """The part of a slice's previous answer (bool, model frame) that belongs to one piece's prompts: its
    connected parts that overlap the piece's box or hold one of its foreground points."""
    labels, n = label_components(previous)
    keep = np.zeros(n + 1, bool)
    if prompts.box is not None:
        r0, c0, r1, c1 = np.round(prompts.box).astype(int)
        keep[np.unique(labels[max(r0, 0):r1 + 1, max(c0, 0):c1 + 1])] = True
    for r, c in pixels_inside(prompts.fg_points, previous.shape):
        keep[labels[r, c]] = True
    keep[0] = False
    return keep[labels]


def clear_around(mask: np.ndarray, points: np.ndarray, radius: float = CLEAR_RADIUS, cap: float = CLEAR_CAP
                 ) -> np.ndarray:
    """``mask`` without a disk around each of ``points`` (N, 2 rows, cols) that lies in it: ``radius`` times the
    point's distance to the mask's edge, at most ``cap`` times the equivalent radius (sqrt(area / pi)) of the
    mask's connected part that holds the point."""
    out = np.asarray(mask, bool).copy()
    for r, c in pixels_inside(points, out.shape):
        if not out[r, c]:
            continue
        edge = float(ndimage.distance_transform_edt(out)[r, c])
        labels, _ = label_components(out)
        part = float((labels == labels[r, c]).sum())
        out &= ~_disk(out.shape, r, c, min(radius * edge, cap * float(np.sqrt(part / np.pi))))
    return out


def tissue_like_clicks(previous: np.ndarray, fg: np.ndarray, bg: np.ndarray, image: np.ndarray,
                       radius: float = LIKE_RADIUS, tolerance: float = LIKE_TOLERANCE) -> np.ndarray:
    """``previous`` with the tissue like each click taken (``region_like``, on the slice ``image`` normalised to
    [0, 1], up to ``radius`` times the click's distance to the edge of ``previous``): added at a foreground
    click outside it, removed at a background click inside it. ``fg``, ``bg``: (N, 2) rows, cols. A slice
    without an answer is returned as it is (there SAM's answer to the click decides)."""
    previous = np.asarray(previous, bool)
    out = previous.copy()
    if not previous.any():
        return out
    for points, value in ((fg, True), (bg, False)):
        rc = [(r, c) for r, c in pixels_inside(points, previous.shape) if previous[r, c] != value]
        if not rc:
            continue
        distance = ndimage.distance_transform_edt(previous != value)  # to the answer's edge
        for r, c in rc:
            out[region_like(image, r, c, radius * float(distance[r, c]), previous != value, tolerance)] = value
    return out


def nearest_answered(answered: np.ndarray, index: int, within: Optional[int] = None) -> Optional[int]:
    """The slice of ``answered`` (the indices of slices with an answer) nearest to ``index``, other than
    ``index`` (and at most ``within`` slices away when given); None when there is none."""
    others = np.asarray(answered, int).ravel()
    others = others[others != index]
    if not len(others):
        return None
    nearest = int(others[np.argmin(np.abs(others - index))])
    return nearest if within is None or abs(nearest - index) <= within else None


def nearest_answer(answers: np.ndarray, index: int) -> Optional[np.ndarray]:
    """The answer (2D, bool) on the slice of ``answers`` (slices along axis 0) nearest to ``index`` that
    holds one, other than ``index``; None when no other slice does."""
    answers = np.asarray(answers, bool)
    near = nearest_answered(np.flatnonzero(answers.any(axis=(1, 2))), index)
    return None if near is None else answers[near]


def within_nearby(answer: np.ndarray, nearby: Optional[np.ndarray], reach: float = NEARBY_REACH) -> np.ndarray:
    """``answer`` kept within ``nearby`` (a neighbouring slice's answer, same shape) grown by ``reach`` times
    its equivalent radius (sqrt(area / pi), at least 3 px); ``answer`` as it is without ``nearby``."""
    answer = np.asarray(answer, bool)
    if nearby is None or not np.any(nearby):
        return answer
    nearby = np.asarray(nearby, bool)
    grow = max(3.0, reach * float(np.sqrt(nearby.sum() / np.pi)))
    return answer & (ndimage.distance_transform_edt(~nearby) <= grow)


def region_like(image: np.ndarray, r: int, c: int, radius: float, within: np.ndarray,
                tolerance: float = LIKE_TOLERANCE) -> np.ndarray:
    """The pixels of ``within`` (bool) connected to (r, c), within ``radius`` of it, whose value in ``image``
    (one slice, normalised to [0, 1]) is within ``tolerance`` of the median of the 5 x 5 pixels around it."""
    image = np.asarray(image, np.float32)
    like = (np.abs(image - float(np.median(image[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3]))) <= tolerance)
    like &= _disk(image.shape, r, c, radius) & np.asarray(within, bool)
    if not like[r, c]:
        return np.zeros(image.shape, bool)
    labels, _ = ndimage.label(like)  # 4-connected: a diagonal touch does not carry it on
    return labels == labels[r, c]


def _disk(shape: tuple, r: int, c: int, radius: float) -> np.ndarray:
    """Bool image of ``shape``: the pixels within ``radius`` of (r, c)."""
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - r) ** 2 + (cols - c) ** 2 <= radius * radius
