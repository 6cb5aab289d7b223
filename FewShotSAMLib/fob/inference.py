"""What FoB inference needs besides the network (``model.py``): the ordered ring of background points
around a mask and the features of the presence score. Training (``tools/fewshotsam_lab/fob_training``)
uses the very same functions, so that channel i of the ring and the presence features mean the same
thing in training, calibration and inference.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..prompts.features import ring


def ring_points(mask: np.ndarray, n: int, inner: int, outer: int, valid: Optional[np.ndarray] = None,
                spacing: str = "pixels") -> np.ndarray:
    """``n`` (row, col) points on the ring between two square dilations of ``mask``, in a fixed order:
    clockwise by angle around the mask's centroid, starting straight up (smallest row).

    ``spacing='pixels'``: equal numbers of ring pixels between consecutive points in that angular order.
    ``spacing='angle'``: point i is the outermost ring pixel on the ray at angle (i + 0.5) * 360 / n degrees
    from the centroid (the ring pixels within 0.05 rad of the ray's closest one). Angles are stable when the
    shape changes between slices, pixel counts are not: a bulge on one side shifts every pixel-spaced
    point along the ring. Returns float32 (n, 2); an empty mask gives an empty array.
    """
    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros((0, 2), np.float32)
    band = ring(m, inner, outer)
    if valid is not None and (band & valid).any():
        band &= valid
    if not band.any():  # the mask fills the frame: fall back to its own boundary
        from scipy import ndimage

        band = m & ~ndimage.binary_erosion(m)
    rows, cols = np.nonzero(band)
    cr, cc = np.nonzero(m)
    r0, c0 = cr.mean(), cc.mean()
    ang = np.mod(np.arctan2(cols - c0, -(rows - r0)), 2 * np.pi)  # 0 = up, increasing clockwise
    radius = np.hypot(rows - r0, cols - c0)
    if spacing == "angle":
        rays = (np.arange(n) + 0.5) * 2 * np.pi / n
        d = np.abs(np.angle(np.exp(1j * (ang[None, :] - rays[:, None]))))  # (n, pixels) angular distance
        near = d <= d.min(1, keepdims=True) + 0.05
        sel = np.where(near, radius[None, :], -1.0).argmax(1)
    elif spacing == "pixels":
        order = np.lexsort((radius, ang))
        pick = ((np.arange(n) + 0.5) * len(order) / n).astype(int).clip(0, len(order) - 1)
        sel = order[pick]
    else:
        raise ValueError(f"ring spacing '{spacing}' is not 'pixels' or 'angle'")
    return np.stack([rows[sel], cols[sel]], 1).astype(np.float32)


def presence_features(corr: torch.Tensor, heatmaps: torch.Tensor, support_area_cells: float) -> np.ndarray:
    """Features of one query for the presence score: max C, log area ratio of C > 0.5 to the support's
    area (both on the feature grid), mean per-channel heatmap peak."""
    c = corr.reshape(-1)
    area = float((c > 0.5).float().sum())
    peak = float(heatmaps.reshape(heatmaps.shape[0], -1).max(-1).values.mean())
    return np.array([float(c.max()), np.log((area + 1.0) / (support_area_cells + 1.0)), peak], np.float64)
