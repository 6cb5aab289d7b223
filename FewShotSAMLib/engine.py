"""The volume engine: the one loop over slices that the command line, the Slicer module and the
evaluation harness all use.

numpy in, numpy out, no file I/O: ``segment_volume(image, spacing, example_mask, ...)`` propagates
outward from the painted slice(s), each query slice prompted from its nearest painted slice, finds the
target's extent automatically (or takes a forced range), and keeps the 3D result connected to the
example. ``VolumeSession`` keeps the backend, the prepared slices and the embedding cache so that several
segments, and re-runs of single slices after a prompt edit, never re-encode a slice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .errors import CancelledError, UserInputError
from .prompts import DEFAULT_GENERATOR, Prompts, QueryContext, Support, make_generator
from .prompts.base import PromptGenerator
from .slices import PreparedVolume
from .volume import Intensity, choose_axis, choose_intensity, painted_slices, slice_to_volume_index, volume_index_to_slice

log = logging.getLogger(__name__)

Extent = Union[str, tuple[int, int]]
Progress = Callable[[int, int], None]


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


@dataclass
class SlicePrompts:
    """Prompts fed to SAM on one slice, in the volume's numpy-order voxel indices (a0, a1, a2)."""

    slice_index: int
    fg: np.ndarray  # (N, 3)
    bg: np.ndarray  # (M, 3)
    box: Optional[np.ndarray]  # (2, 3) corners, or None
    score: float
    presence: float
    support_index: int
    model: Prompts  # the same prompts in the model frame (what the backend saw)


@dataclass
class SegmentationResult:
    """The engine's answer: mask in the image's shape, per-slice prompts and SAM scores."""

    mask: np.ndarray  # bool, image shape
    axis: int
    prompts: dict[int, SlicePrompts] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    painted: list[int] = field(default_factory=list)
    intensity: Optional[Intensity] = None
    seconds: float = 0.0

    @property
    def segmented_slices(self) -> list[int]:
        """Slices with a non-empty result (painted ones included)."""
        other = tuple(a for a in range(3) if a != self.axis)
        return np.flatnonzero(self.mask.any(axis=other)).tolist()


def _bbox(mask: np.ndarray) -> Optional[np.ndarray]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return np.array([rows.min(), cols.min(), rows.max(), cols.max()], np.float32)


def _pool(embedding, mask: np.ndarray):
    """Mean embedding vector under a model-frame mask (area-weighted on the embedding grid)."""
    import torch
    import torch.nn.functional as F

    h, w = embedding.shape[-2:]
    m = F.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float32, device=embedding.device)[None, None],
                              (h, w))[0, 0]
    return (embedding * m).sum((1, 2)) / m.sum().clamp_min(1e-6)


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
        import torch.nn.functional as F

        if not mask.any():
            return -2.0
        f = _pool(embedding, mask)
        return float(F.cosine_similarity(f, self.target, 0) - F.cosine_similarity(f, self.ring, 0))


def keep_connected_to(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Keep the 3D (26-connected) components of ``mask | seed`` that touch ``seed``."""
    from scipy import ndimage

    union = mask | seed
    labels, n = ndimage.label(union, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return union
    keep = np.unique(labels[seed & (labels > 0)])
    return np.isin(labels, keep)


class VolumeSession:
    """One image prepared for one SAM backend: segment any number of targets, re-run single slices.

    ``image`` is the raw 3D array (numpy order), ``spacing`` its voxel size in the same order.
    ``intensity`` defaults to a CT window for Hounsfield data and robust percentiles otherwise.
    """

    def __init__(self, image: np.ndarray, spacing: Sequence[float], *, sam="litemedsam", device: str = "auto",
                 intensity: Optional[Intensity] = None, metadata: Optional[dict] = None,
                 cache=None, cache_cap_bytes: Optional[int] = None) -> None:
        if image.ndim != 3:
            raise UserInputError(f"The image must be a 3D volume; it has {image.ndim} dimension(s).")
        if min(image.shape) < 1:
            raise UserInputError("The image is empty.")
        from .sam import SamBackend, load_backend
        from .sam.cache import DEFAULT_CAP_BYTES, EmbeddingCache

        self.image = image
        self.spacing = np.asarray(spacing, dtype=float)
        self.backend = sam if isinstance(sam, SamBackend) else load_backend(sam, device)
        self.intensity = intensity or choose_intensity(image, metadata)
        self.cache = cache or EmbeddingCache(self.backend, cache_cap_bytes or DEFAULT_CAP_BYTES)
        self._prepared: dict[int, PreparedVolume] = {}

    def prepared(self, axis: int) -> PreparedVolume:
        """The image prepared for slicing across ``axis`` (built once)."""
        if axis not in self._prepared:
            self._prepared[axis] = PreparedVolume(self.image, self.spacing, axis, self.intensity,
                                                  self.backend.input_size)
        return self._prepared[axis]

    # ---- prompts <-> voxels ---------------------------------------------------------------------
    def to_slice_prompts(self, axis: int, index: int, prompts: Prompts, score: float, support: int) -> SlicePrompts:
        """Model-frame prompts on slice ``index`` -> voxel-index SlicePrompts."""
        frame = self.prepared(axis).frame

        def vox(pts):
            return slice_to_volume_index(axis, index, frame.points_to_native(pts))

        box = None
        if prompts.box is not None:
            box = vox(np.asarray(prompts.box, np.float32).reshape(2, 2))
        return SlicePrompts(index, vox(prompts.fg_points), vox(prompts.bg_points), box, float(score),
                            float(prompts.presence), int(support), prompts)

    def prompts_from_voxels(self, axis: int, fg: np.ndarray, bg: np.ndarray,
                            box: Optional[np.ndarray] = None) -> Prompts:
        """Voxel-index points (and box corners) on one slice -> model-frame Prompts."""
        frame = self.prepared(axis).frame

        def model(idx):
            idx = np.asarray(idx, dtype=float).reshape(-1, 3)
            return frame.points_to_model(volume_index_to_slice(axis, idx)[1])

        mbox = None
        if box is not None and len(np.asarray(box).reshape(-1)):
            corners = model(box)
            mbox = np.concatenate([corners.min(0), corners.max(0)])
        return Prompts(model(fg), model(bg), mbox)

    # ---- one slice ------------------------------------------------------------------------------
    def decode_slice(self, axis: int, index: int, prompts: Prompts) -> tuple[np.ndarray, float]:
        """SAM's native-resolution mask (bool, rows x cols) and score for ``prompts`` on one slice,
        from the cached embedding (encoding the slice only if it never was)."""
        pv = self.prepared(axis)
        emb = self.cache.get(pv.key(index), pv.frame_for_key)
        if prompts.is_empty:
            return np.zeros(pv.slices.shape[1:], bool), 0.0
        res = self.backend.decode(emb, prompts)
        logits = np.where(pv.valid, res.logits, -20.0)
        return pv.frame.to_native(logits) > 0, res.score

    # ---- the volume -----------------------------------------------------------------------------
    def segment(self, example_mask: np.ndarray, *, generator: Union[str, PromptGenerator] = DEFAULT_GENERATOR,
                extent: Extent = "auto", axis: Optional[int] = None, rules: Optional[ExtentRules] = None,
                progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
                connected: bool = True) -> SegmentationResult:
        """Segment the target painted in ``example_mask`` (bool, image shape) on every slice.

        ``extent`` is "auto" (propagate until the target ends) or (z0, z1), an inclusive forced range
        of slice indices along the slicing axis. ``progress(done, total)`` is called after each slice;
        ``cancel()`` returning True raises CancelledError within one slice.
        """
        t0 = time.perf_counter()
        example = np.asarray(example_mask).astype(bool)
        if example.shape != self.image.shape:
            raise UserInputError(
                f"The example has shape {example.shape} but the image has {self.image.shape}; paint it on this image.")
        if not example.any():
            raise UserInputError("The example is empty: paint the target on at least one slice.")
        gen = make_generator(generator)
        rules = rules or ExtentRules()
        axis = choose_axis(example, self.spacing) if axis is None else int(axis)
        pv = self.prepared(axis)
        n = pv.n_slices
        painted = painted_slices(example, axis).tolist()
        ex_slices = np.moveaxis(example, axis, 0)

        if extent == "auto" or extent is None:
            lo, hi, forced = 0, n - 1, False
        else:
            lo, hi = int(extent[0]), int(extent[1])
            if not (0 <= lo <= hi < n):
                raise UserInputError(
                    f"The slice range {lo}:{hi} is outside the volume, which has slices 0 to {n - 1} along the "
                    f"slicing axis; pick a range inside it.")
            forced = True

        # Supports: the painted slices, encoded first.
        total = max(1, hi - lo + 1)
        done = 0

        def tick(k: int = 1) -> None:
            nonlocal done
            done += k
            if progress is not None:
                progress(min(done, total), total)
            if cancel is not None and cancel():
                raise CancelledError("cancelled")

        if cancel is not None and cancel():
            raise CancelledError("cancelled")
        supports: dict[int, Support] = {}
        evidence: dict[int, TargetEvidence] = {}
        for p, emb in zip(painted, pv.embeddings(self.cache, painted)):
            supports[p] = Support(emb, pv.mask_to_model(ex_slices[p]), p)
            evidence[p] = TargetEvidence(supports[p], rules.ring, self.backend.input_size)

        out = np.zeros((n,) + pv.slices.shape[1:], bool)
        for p in painted:
            out[p] = ex_slices[p]
        result = SegmentationResult(mask=np.zeros_like(example), axis=axis, painted=painted,
                                    intensity=self.intensity)

        # Runs: (start, stop, step, stoppable) outward from the painted slices; between two painted
        # slices each half is propagated from its own side.
        runs: list[tuple[int, int, int, bool]] = []
        runs.append((painted[-1] + 1, hi + 1, 1, not forced))
        runs.append((painted[0] - 1, lo - 1, -1, not forced))
        for a, b in zip(painted[:-1], painted[1:]):
            mid = (a + b) // 2
            runs.append((a + 1, mid + 1, 1, False))
            runs.append((b - 1, mid, -1, False))

        for start, stop, step, stoppable in runs:
            neighbour_idx = start - step
            neighbour_model = pv.mask_to_model(out[neighbour_idx]) if 0 <= neighbour_idx < n else None
            for q in range(start, stop, step):
                if not (lo <= q <= hi):
                    break
                sup_idx = min(painted, key=lambda p: (abs(p - q), p))
                sup = supports[sup_idx]
                # Prefetch a batch ahead along the run so the encoder works in batches.
                ahead = [k for k in range(q, stop, step)][: self.backend.batch_size]
                pv.embeddings(self.cache, ahead)
                emb = self.cache.get(pv.key(q))
                ctx = QueryContext(neighbour_model, pv.valid, q, abs(q - sup_idx))
                prompts = gen.generate(sup, emb, ctx, self.backend)
                if prompts.is_empty:
                    if stoppable:
                        break
                    tick()
                    continue
                res = self.backend.decode(emb, prompts)
                mmask = res.mask & pv.valid
                if stoppable and not (
                        self._accept(mmask, res.score, prompts.presence, neighbour_model, sup.mask, rules)
                        and evidence[sup_idx].score(emb, mmask) > rules.min_evidence):
                    log.debug("extent stops before slice %d", q)
                    break
                logits = np.where(pv.valid, res.logits, -20.0)
                out[q] = pv.frame.to_native(logits) > 0
                result.prompts[q] = self.to_slice_prompts(axis, q, prompts, res.score, sup_idx)
                result.scores[q] = res.score
                neighbour_model = mmask
                tick()

        mask = np.moveaxis(out, 0, axis)
        if connected:
            mask = keep_connected_to(mask, example)
        for p in painted:  # painted slices exactly as painted
            sl = [slice(None)] * 3
            sl[axis] = p
            mask[tuple(sl)] = np.moveaxis(example, axis, 0)[p]
        result.mask = mask
        result.seconds = time.perf_counter() - t0
        return result

    def segment_from_prompts(self, example_mask: np.ndarray, axis: int, prompts: dict[int, dict], *,
                             progress: Optional[Progress] = None,
                             cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
        """SAM's result for given (e.g. edited) prompts: ``prompts[slice] = {'fg', 'bg', 'box'}`` in
        numpy-order voxel indices. Only those slices are decoded; painted slices stay as painted."""
        t0 = time.perf_counter()
        example = np.asarray(example_mask).astype(bool)
        pv = self.prepared(axis)
        painted = painted_slices(example, axis).tolist()
        out = np.zeros((pv.n_slices,) + pv.slices.shape[1:], bool)
        result = SegmentationResult(mask=example, axis=axis, painted=painted, intensity=self.intensity)
        order = sorted(prompts)
        pv.embeddings(self.cache, order)
        for done, k in enumerate(order, 1):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            p = prompts[k]
            mp = self.prompts_from_voxels(axis, p["fg"], p["bg"], p.get("box"))
            out[k], score = self.decode_slice(axis, k, mp)
            result.prompts[k] = self.to_slice_prompts(axis, k, mp, score, min(painted, key=lambda s: abs(s - k)))
            result.scores[k] = score
            if progress is not None:
                progress(done, len(order))
        ex_slices = np.moveaxis(example, axis, 0)
        for p in painted:
            out[p] = ex_slices[p]
        result.mask = np.moveaxis(out, 0, axis)
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _accept(mask: np.ndarray, score: float, presence: float, neighbour: Optional[np.ndarray],
                support: np.ndarray, rules: ExtentRules) -> bool:
        area = int(mask.sum())
        if presence < rules.min_presence or score < rules.min_score:
            return False
        if area < max(4, rules.min_area_fraction * int(support.sum())):
            return False
        if neighbour is not None and neighbour.any():
            if area > rules.max_area_growth * neighbour.sum():
                return False
            if (mask & neighbour).sum() / area < rules.min_overlap:
                return False
        return True


def segment_volume(image: np.ndarray, spacing: Sequence[float], example_mask: np.ndarray, *,
                   generator: Union[str, PromptGenerator] = DEFAULT_GENERATOR, sam="litemedsam",
                   device: str = "auto", extent: Extent = "auto", intensity: Optional[Intensity] = None,
                   metadata: Optional[dict] = None, progress: Optional[Progress] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
    """Segment the target painted in ``example_mask`` on every slice of ``image`` (one-call API)."""
    session = VolumeSession(image, spacing, sam=sam, device=device, intensity=intensity, metadata=metadata)
    return session.segment(example_mask, generator=generator, extent=extent, progress=progress, cancel=cancel)
