"""The structure of a target on one slice: its pieces (connected components) and its holes (background
enclosed by the target), so that the engine can prompt each piece on its own and tell SAM that a cavity
(the spinal canal inside a vertebra, a lumen inside a wall) is not the target.

Foreground is 8-connected and background 4-connected (the usual pair, so that a diagonal gap in a ring
does not open its hole). All functions work on 2D boolean arrays in any frame; sizes are in pixels of
that frame. The small mask helpers that the engine and the prompt generators share live here too:
``mask_box`` (a mask's bounding box), ``widened_box`` (a box widened where a mask reaches it),
``label_components`` (a label image of the 8-connected components) beside ``components`` (the same
components as a list of masks, largest first), ``pixels_inside`` (points rounded to the pixels inside an
image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage

EIGHT = np.ones((3, 3), bool)
FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass
class ShapeRules:
    """What counts as a piece or a hole. A piece must hold at least ``min_piece_fraction`` of the target's
    area and ``min_piece_pixels`` pixels; a hole at least ``min_hole_pixels`` pixels and
    ``min_hole_fraction`` of its enclosing piece's filled area. Pixel counts are for a 256-pixel frame and
    scale with the frame's area (``scale`` = frame size / 256). The remaining fields say how the engine
    uses pieces and holes."""

    min_piece_fraction: float = 0.1
    min_piece_pixels: int = 16
    min_hole_pixels: int = 6
    min_hole_fraction: float = 0.01
    # How the engine uses them.
    per_piece: bool = True  # prompt each piece on its own (else the whole target as one)
    # A background point inside each hole. Off: measured on CHAOS (20 volumes, product protocol) and on the
    # TotalSegmentator CT (24 structures), LiteMedSAM's answers are better without them (docs/RESULTS.md,
    # "Pieces and holes"); a hole SAM fills is still removed (subtract_holes).
    hole_points: bool = False
    subtract_holes: bool = True  # decode a hole SAM filled as its own target and remove it
    hole_box_margin: float = 2.0  # pixels around the previous slice's hole for its box
    hole_reach: float = 4.0  # a hole found on the next slice stays this close to the previous one
    max_hole_fraction: float = 0.5  # of the piece's filled area
    merge_overlap: float = 0.5  # pieces overlapping more than this continue as one


@dataclass
class SliceShape:
    """Pieces (largest first) and holes of a 2D mask; ``hole_owner[i]`` is the piece enclosing hole i."""

    pieces: list[np.ndarray] = field(default_factory=list)
    holes: list[np.ndarray] = field(default_factory=list)
    hole_owner: list[int] = field(default_factory=list)

    @property
    def is_simple(self) -> bool:
        """One piece and no hole: the plain one-blob case."""
        return len(self.pieces) <= 1 and not self.holes

    def holes_of(self, piece: int) -> list[np.ndarray]:
        """The holes enclosed by piece ``piece``."""
        return [h for h, o in zip(self.holes, self.hole_owner) if o == piece]


def _regions(mask: np.ndarray, structure: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """Connected regions of ``mask`` (by ``structure``) with at least ``min_pixels`` pixels, largest first."""
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_pixels]
    return [labels == i + 1 for i in order]


def mask_box(mask: np.ndarray, margin: float = 0.0, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """(row0, col0, row1, col1) of a boolean mask, enlarged by ``margin`` pixels and clipped to ``shape``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = shape or mask.shape
    return np.array([max(0, rows.min() - margin), max(0, cols.min() - margin),
                     min(h - 1, rows.max() + margin), min(w - 1, cols.max() + margin)], np.float32)


def widened_box(mask: np.ndarray, box: np.ndarray, step: float, limits: np.ndarray, touch: float = 1.0
                ) -> Optional[np.ndarray]:
    """``box`` (row0, col0, row1, col1) widened by ``step`` pixels on each side that ``mask`` reaches (comes
    within ``touch`` pixels of), never beyond ``limits`` (a box, e.g. the image's); None when no side moves
    (``mask`` empty, inside the box, or reaching only sides already at the limits)."""
    extent = mask_box(mask)
    if extent is None:
        return None
    box = np.asarray(box, np.float32)
    new = box.copy()
    reached = (extent[0] <= box[0] + touch, extent[1] <= box[1] + touch,
               extent[2] >= box[2] - touch, extent[3] >= box[3] - touch)
    for side, hit in enumerate(reached):
        if hit:
            new[side] = max(limits[side], box[side] - step) if side < 2 else min(limits[side], box[side] + step)
    return None if np.array_equal(new, box) else new


def pixels_inside(points: np.ndarray, shape: tuple) -> np.ndarray:
    """(K, 2) int rows, cols: ``points`` (N, 2, any float) rounded to pixels, those inside an image of ``shape``."""
    rc = np.round(np.asarray(points, float)).astype(int).reshape(-1, 2)
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < shape[1])
    return rc[ok]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2D bool mask as a label image: (labels, count)."""
    return ndimage.label(np.asarray(mask, bool), structure=EIGHT)


def components(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """8-connected components of ``mask`` with at least ``min_pixels`` pixels, largest first."""
    return _regions(np.asarray(mask, bool), EIGHT, min_pixels)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every enclosed background region filled."""
    return ndimage.binary_fill_holes(np.asarray(mask, bool), structure=FOUR)


def holes(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """Background regions (4-connected) enclosed by ``mask`` with at least ``min_pixels`` pixels, largest
    first. Background touching the array's border is never a hole."""
    mask = np.asarray(mask, bool)
    return _regions(fill_holes(mask) & ~mask, FOUR, min_pixels)


def analyse_slice(mask: np.ndarray, rules: Optional[ShapeRules] = None, scale: float = 1.0) -> SliceShape:
    """Pieces and holes of a 2D ``mask`` under ``rules`` (``scale`` = frame size / 256)."""
    rules = rules or ShapeRules()
    mask = np.asarray(mask, bool)
    area = int(mask.sum())
    if area == 0:
        return SliceShape()
    px = scale * scale
    min_piece = max(1, int(round(rules.min_piece_pixels * px)), int(np.ceil(rules.min_piece_fraction * area)))
    pieces = components(mask, min_piece)
    out = SliceShape(pieces=pieces)
    min_hole = max(1, int(round(rules.min_hole_pixels * px)))
    for i, piece in enumerate(pieces):
        filled = int(fill_holes(piece).sum())
        for h in holes(piece, max(min_hole, int(np.ceil(rules.min_hole_fraction * filled)))):
            out.holes.append(h)
            out.hole_owner.append(i)
    return out


def inner_point(region: np.ndarray) -> Optional[np.ndarray]:
    """The (row, col) of ``region`` farthest from its boundary (its most interior pixel), or None."""
    region = np.asarray(region, bool)
    if not region.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([r, c], np.float32)


def overlap_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / min(|a|, |b|) (0 when either is empty): how much the smaller region lies in the other."""
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 or nb == 0:
        return 0.0
    return float((a & b).sum()) / min(na, nb)
