"""Training episodes for FoB without annotations: supervoxel pseudo-labels on adjacent slices.

An episode is (support embedding, support mask, query embedding, query mask) where both masks are the same
3D supervoxel on two adjacent slices, each at least ``min_pixels`` model-frame pixels. Augmentation is
applied to the *query embedding and mask* (affine + elastic warp, feature jitter) instead of to the image
before encoding: re-encoding an augmented slice costs seconds on this CPU, warping a 64x64 embedding costs
milliseconds. Intensity (gamma) augmentation has no exact embedding-space equivalent; per-channel
multiplicative jitter and additive noise stand in for it.

Ring points: ``ring_points`` (``FewShotSAMLib/fob/inference.py``) is the one function that orders background
points, used for the support prompts, the query ground truth and inference alike, so channel i means the
same place everywhere.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from FewShotSAMLib.fob.inference import ring_points

log = logging.getLogger(__name__)


def outer_band(mask: np.ndarray, width: int = 4) -> np.ndarray:
    """The outermost ``width`` pixels of the mask (foreground minus its erosion); the mask if too thin."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    inner = ndimage.binary_erosion(m, np.ones((3, 3), bool), iterations=width)
    band = m & ~inner
    return band if band.any() else m


# ------------------------------------------------------------------------------------------------
# Augmentation on embeddings + masks
# ------------------------------------------------------------------------------------------------
@dataclass
class Augment:
    """Random affine + elastic warp applied jointly to an embedding (C, h, w) and a mask (S, S)."""

    p: float = 0.8
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.88, 1.12)
    shift: float = 0.06  # fraction of the half-extent (normalised units)
    elastic: float = 0.03  # displacement amplitude (normalised units)
    elastic_grid: int = 5
    jitter: float = 0.05
    noise: float = 0.02

    def grid(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        """A (1, size, size, 2) sampling grid (normalised, align_corners=False) for one random warp."""
        a = math.radians(rng.uniform(-self.rotate_deg, self.rotate_deg))
        s = rng.uniform(*self.scale)
        t = rng.uniform(-self.shift, self.shift, 2)
        theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, t[0]],
                              [math.sin(a) / s, math.cos(a) / s, t[1]]], dtype=torch.float32)[None]
        g = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
        if self.elastic > 0:
            disp = torch.from_numpy(rng.normal(0, self.elastic, (1, 2, self.elastic_grid, self.elastic_grid))
                                    .astype(np.float32))
            disp = F.interpolate(disp, size=(size, size), mode="bicubic", align_corners=False)
            g = g + disp.permute(0, 2, 3, 1)
        return g

    def __call__(self, rng: np.random.Generator, emb: torch.Tensor, mask: np.ndarray
                 ) -> tuple[torch.Tensor, np.ndarray]:
        """Warped (embedding, mask); unchanged with probability 1 - p (jitter always applies)."""
        if rng.random() < self.p:
            seed = int(rng.integers(1 << 31))
            g_big = self.grid(np.random.default_rng(seed), mask.shape[-1])
            g_small = self.grid(np.random.default_rng(seed), emb.shape[-1])
            emb = F.grid_sample(emb[None], g_small, mode="bilinear", padding_mode="border",
                                align_corners=False)[0]
            m = torch.from_numpy(mask.astype(np.float32))[None, None]
            mask = F.grid_sample(m, g_big, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy() > 0.5
        if self.jitter > 0 or self.noise > 0:
            c = emb.shape[0]
            gain = 1 + self.jitter * torch.from_numpy(rng.standard_normal(c).astype(np.float32))[:, None, None]
            emb = emb * gain + self.noise * emb.std() * torch.from_numpy(
                rng.standard_normal(emb.shape).astype(np.float32))
        return emb, mask


# ------------------------------------------------------------------------------------------------
# Episodes from supervoxels
# ------------------------------------------------------------------------------------------------
@dataclass
class VolumeEpisodes:
    """One training volume: its prepared slices, supervoxel labels (model frame) and valid pairs."""

    name: str
    prepared: object  # slices.PreparedVolume
    labels: np.ndarray  # (n, S, S) int32 supervoxels in the model frame
    pairs: list = field(default_factory=list)  # (support z, query z, label)
    ends: list = field(default_factory=list)  # (support z, query z, label) where the label vanishes on query


def model_frame_labels(pv, labels: np.ndarray) -> np.ndarray:
    """Supervoxel labels (volume shape) -> (n, S, S) model-frame labels (nearest)."""
    sl = np.moveaxis(labels, pv.axis, 0)
    return np.stack([pv.frame.to_model(s.astype(np.float32), nearest=True).astype(np.int32) for s in sl])


def find_pairs(labels: np.ndarray, min_pixels: int = 200, excluded: Optional[np.ndarray] = None,
               max_gap: int = 1) -> tuple[list, list]:
    """Adjacent-slice pairs sharing a supervoxel with >= ``min_pixels`` on both slices (both directions),
    and 'end' pairs where a big supervoxel on the support slice is absent on the query slice (used only to
    calibrate the presence score). ``excluded[z]`` True drops slice z (Setting II)."""
    n = labels.shape[0]
    counts = []
    for z in range(n):
        ids, cnt = np.unique(labels[z], return_counts=True)
        counts.append({int(i): int(c) for i, c in zip(ids, cnt) if i > 0})
    pairs, ends = [], []
    for z in range(n):
        if excluded is not None and excluded[z]:
            continue
        for gap in range(1, max_gap + 1):
            for q in (z - gap, z + gap):
                if not 0 <= q < n or (excluded is not None and excluded[q]):
                    continue
                for lab, c in counts[z].items():
                    if c < min_pixels:
                        continue
                    cq = counts[q].get(lab, 0)
                    if cq >= min_pixels:
                        pairs.append((z, q, lab))
                    elif cq == 0 and gap == 1:
                        ends.append((z, q, lab))
    return pairs, ends


def load_volume_episodes(image_path: Path, backend, cache_dir: Path, *, min_pixels: int = 200,
                         exclude_labels: Sequence[int] = (), label_path: Optional[Path] = None,
                         supervoxel_kwargs: Optional[dict] = None, max_gap: int = 1):
    """Read one volume, compute (or load cached) supervoxels and its episode pairs."""
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity, normalise, read_volume

    from .supervoxels import supervoxels

    vol = read_volume(image_path)
    intensity = choose_intensity(vol.array, vol.metadata)
    pv = PreparedVolume(vol.array, vol.spacing, 0, intensity, backend.input_size)
    kw = dict(supervoxel_kwargs or {})
    tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    sv_path = Path(cache_dir) / "supervoxels" / f"{pv.token}_{tag or 'default'}.npy"
    if sv_path.exists():
        labels = np.load(sv_path)
    else:
        labels = supervoxels(normalise(vol.array, intensity), vol.spacing, **kw)
        sv_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(sv_path, labels)
    excluded = None
    if exclude_labels:
        if label_path is None or not Path(label_path).exists():
            from FewShotSAMLib.errors import UserInputError

            raise UserInputError(f"--exclude-labels needs the label file of {image_path.name} "
                                 f"(label_<id>.nii.gz beside it); it is missing.")
        lab = read_volume(label_path, "label").array
        excluded = np.isin(np.moveaxis(lab, 0, 0), list(exclude_labels)).any(axis=(1, 2))
    mlabels = model_frame_labels(pv, labels)
    pairs, ends = find_pairs(mlabels, min_pixels, excluded, max_gap)
    return VolumeEpisodes(image_path.name, pv, mlabels, pairs, ends)


@dataclass
class Episode:
    """One sampled training episode (tensors ready for the network, batch of 1)."""

    support_emb: torch.Tensor  # (1, C, h, w)
    support_mask: torch.Tensor  # (1, S, S) float
    support_points: torch.Tensor  # (1, Np, 2)
    support_band: torch.Tensor  # (1, S, S) float, outermost band of the support mask
    query_emb: torch.Tensor
    query_mask: torch.Tensor
    query_points: torch.Tensor  # (1, Np, 2) ground truth ring, same order as support


def make_episode(support_emb: torch.Tensor, support_mask: np.ndarray, query_emb: torch.Tensor,
                 query_mask: np.ndarray, n: int, inner: int, outer: int, valid: Optional[np.ndarray] = None,
                 spacing: str = "pixels") -> Episode:
    """Assemble an Episode (ring points for support and query from the same function and order)."""
    sp = ring_points(support_mask, n, inner, outer, valid, spacing)
    qp = ring_points(query_mask, n, inner, outer, valid, spacing)
    return Episode(support_emb[None].float(), torch.from_numpy(support_mask.astype(np.float32))[None],
                   torch.from_numpy(sp)[None], torch.from_numpy(outer_band(support_mask).astype(np.float32))[None],
                   query_emb[None].float(), torch.from_numpy(query_mask.astype(np.float32))[None],
                   torch.from_numpy(qp)[None])


class EpisodeSampler:
    """Draws random episodes from several volumes through the embedding cache."""

    def __init__(self, volumes: list[VolumeEpisodes], cache, cfg, augment: Optional[Augment] = None,
                 seed: int = 0) -> None:
        self.volumes = [v for v in volumes if v.pairs]
        if not self.volumes:
            from FewShotSAMLib.errors import UserInputError

            raise UserInputError("No training episodes: no volume has two adjacent slices sharing a supervoxel "
                                 "large enough; use more or larger volumes.")
        self.cache = cache
        self.cfg = cfg
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def emb(self, v: VolumeEpisodes, z: int) -> torch.Tensor:
        """Cached embedding of slice z of volume v (float32, CPU)."""
        return self.cache.get(v.prepared.key(z), v.prepared.frame_for_key).float().cpu()

    def sample(self, ends: bool = False) -> Episode:
        """One random episode (``ends=True``: a pair whose query no longer holds the supervoxel)."""
        rng = self.rng
        while True:
            v = self.volumes[int(rng.integers(len(self.volumes)))]
            pool = v.ends if ends else v.pairs
            if pool:
                break
        zs, zq, lab = pool[int(rng.integers(len(pool)))]
        sm = v.labels[zs] == lab
        qm = v.labels[zq] == lab
        qe = self.emb(v, zq)
        if self.augment is not None and not ends:
            qe, qm = self.augment(rng, qe, qm)
            if qm.sum() < 20:  # warped out of the frame: keep the original
                qe, qm = self.emb(v, zq), v.labels[zq] == lab
        return make_episode(self.emb(v, zs), sm, qe, qm, self.cfg.n_bg, self.cfg.ring_inner,
                            self.cfg.ring_outer, v.prepared.valid, self.cfg.ring_spacing)
