"""A PNG montage of evenly spaced slices with the mask outline and the prompts, to check a result at a glance."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .engine import SegmentationResult
from .volume import Intensity, atomic_write, normalise, slice_frame, volume_index_to_slice

TILE = 256
COLOURS = {"outline": (0, 230, 255), "reference": (255, 120, 0), "fg": (60, 220, 60), "bg": (40, 40, 255),
           "box": (255, 200, 0)}  # BGR for OpenCV


def montage_slices(result: SegmentationResult, count: int = 12) -> list[int]:
    """Up to ``count`` evenly spaced slice indices over the segmented range."""
    seg = result.segmented_slices
    if not seg:
        return []
    return sorted(set(np.linspace(seg[0], seg[-1], num=min(count, seg[-1] - seg[0] + 1)).round().astype(int).tolist()))


def render_overlay(image: np.ndarray, spacing, intensity: Intensity, result: SegmentationResult,
                   reference: Optional[np.ndarray] = None, count: int = 12, columns: int = 4) -> np.ndarray:
    """BGR uint8 montage: each tile one slice at physical aspect, mask outline, fg (green) / bg (red)
    points, box (yellow), optional reference outline (blue), slice number in the corner."""
    import cv2

    axis = result.axis
    frame = slice_frame(image.shape, spacing, axis, TILE)
    indices = montage_slices(result, count)
    tiles = []
    for k in indices:
        sl = np.take(image, k, axis=axis)
        gray = (frame.to_model(normalise(sl, intensity)) * 255).astype(np.uint8)
        tile = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        layers = [(np.take(result.mask, k, axis=axis), "outline")]
        if reference is not None:
            layers.insert(0, (np.take(reference, k, axis=axis), "reference"))
        for m, name in layers:
            mm = frame.mask_to_model(m).astype(np.uint8)
            contours, _ = cv2.findContours(mm, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, COLOURS[name], 1)
        sp = result.prompts.get(k)
        if sp is not None:
            if sp.box is not None:  # two corners per piece
                corners = frame.points_to_model(volume_index_to_slice(axis, sp.box)[1]).reshape(-1, 2, 2)
                for pair in corners:
                    (r0, c0), (r1, c1) = pair.min(0), pair.max(0)
                    cv2.rectangle(tile, (int(c0), int(r0)), (int(c1), int(r1)), COLOURS["box"], 1)
            for pts, name in ((sp.fg, "fg"), (sp.bg, "bg")):
                for r, c in frame.points_to_model(volume_index_to_slice(axis, pts)[1]):
                    cv2.circle(tile, (int(round(c)), int(round(r))), 3, COLOURS[name], -1)
        label = f"{k}{' painted' if k in result.painted else ''}"
        cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        tiles = [np.zeros((TILE, TILE, 3), np.uint8)]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * TILE, columns * TILE, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = t
    return sheet


def write_overlay(path: str | os.PathLike, sheet: np.ndarray) -> None:
    """Write the montage PNG atomically."""
    import cv2

    def write(tmp: str) -> None:
        if not cv2.imwrite(tmp, sheet):
            raise OSError(f"could not write {path}")

    atomic_write(path, write)
