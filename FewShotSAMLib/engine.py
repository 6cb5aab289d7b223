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
from .prompt_types import Prompts, QueryContext, SlicePrompts, Support
from .prompts import DEFAULT_GENERATOR, make_generator
from .prompts.base import PromptGenerator
from .sam.names import DEFAULT_SAM
from .threads import single_threaded_blas
from .shape import ShapeRules, analyse_slice, fill_holes, holes, inner_point, overlap_fraction
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


def keep_connected_to(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Keep the 3D (26-connected) components of ``mask | seed`` that touch ``seed``.

    Labelling runs only inside the bounding box of ``mask | seed``, so a large CT costs no
    volume-sized label array.
    """
    from scipy import ndimage

    union = mask | seed
    if not union.any():
        return union
    # the bounding box from per-axis projections (np.nonzero would make three int64 index arrays as
    # long as the mask has voxels: hundreds of MB for an organ in a large CT)
    box = tuple(slice(int(hit[0]), int(hit[-1]) + 1) for hit in (painted_slices(union, a) for a in range(3)))
    structure = np.ones((3, 3, 3), bool)
    try:  # 16-bit labels when the components fit: half the memory of the default 32-bit ones
        labels = np.empty(union[box].shape, np.int16)
        n = ndimage.label(union[box], structure=structure, output=labels)
    except RuntimeError:  # more components than 16 bits hold
        labels, n = ndimage.label(union[box], structure=structure)
    if n <= 1:
        return union
    keep = np.unique(labels[seed[box]])  # seed lies inside union, so every seed voxel has a label
    union[box] = np.isin(labels, keep)  # union is this function's own array: no second mask
    return union


@dataclass
class _Piece:
    """One piece of the target followed outward from a painted slice (its own prompts and extent)."""

    support: Support  # the painted slice's embedding with this piece's mask
    evidence: TargetEvidence
    neighbour: np.ndarray  # model-frame mask of the piece on the last accepted slice
    holes: list  # model-frame masks of the piece's holes on the last accepted slice
    alive: bool = True


def _stack_points(parts: Sequence[np.ndarray]) -> np.ndarray:
    parts = [np.asarray(p, np.float32).reshape(-1, 2) for p in parts]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)


def _box_distance(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Distance of (N, 2) model-frame points to a (r0, c0, r1, c1) box (0 inside)."""
    dr = np.maximum(0, np.maximum(box[0] - points[:, 0], points[:, 0] - box[2]))
    dc = np.maximum(0, np.maximum(box[1] - points[:, 1], points[:, 1] - box[3]))
    return np.hypot(dr, dc)


def split_by_boxes(prompts: Prompts, boxes: np.ndarray) -> list[Prompts]:
    """One Prompts per box of ``boxes`` ((k, 4) model frame), each point going to the box that holds it
    (the smallest if several do) or else to the nearest box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)

    def owner(points: np.ndarray) -> np.ndarray:
        if not len(points):
            return np.zeros(0, int)
        d = np.stack([_box_distance(points, b) for b in boxes], 1)  # (N, k)
        key = d * 1e6 + areas[None, :]  # nearest first, then smallest
        return np.argmin(key, 1)

    fo, bo = owner(prompts.fg_points), owner(prompts.bg_points)
    return [Prompts(prompts.fg_points[fo == i], prompts.bg_points[bo == i], boxes[i], prompts.presence)
            for i in range(len(boxes))]


class VolumeSession:
    """One image prepared for one SAM backend: segment any number of targets, re-run single slices.

    ``image`` is the raw 3D array (numpy order), ``spacing`` its voxel size in the same order.
    ``intensity`` defaults to a CT window for Hounsfield data and robust percentiles otherwise.
    ``options`` (a ``RuntimeOptions``; None: the FEWSHOTSAM_* environment) build the backend named by
    ``sam`` and the embedding cache when they are not given.
    """

    def __init__(self, image: np.ndarray, spacing: Sequence[float], *, sam=DEFAULT_SAM, device: str = "auto",
                 intensity: Optional[Intensity] = None, metadata: Optional[dict] = None,
                 cache=None, cache_cap_bytes: Optional[int] = None, options=None) -> None:
        if image.ndim != 3:
            raise UserInputError(f"The image must be a 3D volume; it has {image.ndim} dimension(s).")
        if min(image.shape) < 1:
            raise UserInputError("The image is empty.")
        from .sam import SamBackend, load_backend
        from .sam.cache import EmbeddingCache

        self.image = image
        self.spacing = np.asarray(spacing, dtype=float)
        self.backend = sam if isinstance(sam, SamBackend) else load_backend(sam, device, options=options)
        self.intensity = intensity or choose_intensity(image, metadata)
        self.cache = cache or EmbeddingCache(self.backend, cache_cap_bytes, options=options)
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
                            box: Optional[np.ndarray] = None) -> Union[Prompts, list[Prompts]]:
        """Voxel-index points (and box corners) on one slice -> model-frame Prompts.

        ``box`` holds two corners per piece; with several pieces ((2k, 3) corners) the answer is one
        Prompts per piece, each point going to the piece whose box holds it (else the nearest box)."""
        frame = self.prepared(axis).frame

        def model(idx):
            idx = np.asarray(idx, dtype=float).reshape(-1, 3)
            return frame.points_to_model(volume_index_to_slice(axis, idx)[1])

        corners = np.asarray(box if box is not None else np.zeros((0, 3)), dtype=float).reshape(-1, 3)
        boxes = []
        for i in range(0, len(corners) - 1, 2):
            c = model(corners[i:i + 2])
            boxes.append(np.concatenate([c.min(0), c.max(0)]))
        if len(boxes) > 1:
            return split_by_boxes(Prompts(model(fg), model(bg)), np.stack(boxes))
        if not boxes and len(corners):  # a single stray corner: keep the old min/max behaviour
            c = model(corners)
            boxes = [np.concatenate([c.min(0), c.max(0)])]
        return Prompts(model(fg), model(bg), boxes[0] if boxes else None)

    # ---- one slice ------------------------------------------------------------------------------
    @single_threaded_blas()
    def decode_slice(self, axis: int, index: int, prompts: Union[Prompts, Sequence[Prompts]]
                     ) -> tuple[np.ndarray, float]:
        """SAM's native-resolution mask (bool, rows x cols) and score for ``prompts`` on one slice,
        from the cached embedding (encoding the slice only if it never was). A list of Prompts (one per
        piece) is decoded piece by piece and united; the score is then the pieces' mean."""
        pv = self.prepared(axis)
        emb = self.cache.get(pv.key(index), pv.frame_for_key)
        parts = [prompts] if isinstance(prompts, Prompts) else list(prompts)
        out = np.zeros(pv.slices.shape[1:], bool)
        scores = []
        for p in parts:
            if p.is_empty:
                continue
            res = self.backend.decode(emb, p)
            logits = np.where(pv.valid, res.logits, -20.0)
            out |= pv.frame.to_native(logits) > 0
            scores.append(float(res.score))
        return out, (float(np.mean(scores)) if scores else 0.0)

    # ---- the volume -----------------------------------------------------------------------------
    @single_threaded_blas()
    def segment(self, example_mask: np.ndarray, *, generator: Union[str, PromptGenerator] = DEFAULT_GENERATOR,
                extent: Extent = "auto", axis: Optional[int] = None, rules: Optional[ExtentRules] = None,
                progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
                connected: bool = True, shape: Optional[ShapeRules] = None,
                release_embeddings: bool = False) -> SegmentationResult:
        """Segment the target painted in ``example_mask`` (bool, image shape) on every slice.

        ``extent`` is "auto" (propagate until the target ends) or (z0, z1), an inclusive forced range
        of slice indices along the slicing axis. ``progress(done, total)`` is called after each slice;
        ``cancel()`` returning True raises CancelledError within one slice.

        A target painted in several pieces (e.g. both kidneys) is followed piece by piece, each with its
        own prompts and its own extent, and the pieces are united; holes in the painted target (e.g. the
        spinal canal inside a vertebra) get background points and are decoded and removed where SAM
        fills them. ``shape`` says what counts as a piece or a hole and switches these off.

        ``release_embeddings`` drops the embeddings held in memory once every slice is decoded, before the
        3D connectivity step, for callers that will not re-run slices (the ``segment`` command: on a large
        CT that step and the cache's cap would otherwise add up at the peak).
        """
        t0 = time.perf_counter()
        shape_rules = shape or ShapeRules()
        example = np.asarray(example_mask, dtype=bool)
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
        for p, emb in zip(painted, pv.embeddings(self.cache, painted)):
            supports[p] = Support(emb, pv.mask_to_model(ex_slices[p]), p)
        scale = self.backend.input_size / 256.0
        layouts = {p: analyse_slice(supports[p].mask, shape_rules, scale) for p in painted}

        out = np.zeros((n,) + pv.slices.shape[1:], bool)
        for p in painted:
            out[p] = ex_slices[p]
        result = SegmentationResult(mask=np.zeros((0, 0, 0), bool), axis=axis, painted=painted,
                                    intensity=self.intensity)  # the mask is set at the end

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
            origin = start - step
            if not (lo <= start <= hi) or origin not in supports:
                continue
            pieces = self._pieces(supports[origin], layouts[origin], rules, shape_rules)
            for q in range(start, stop, step):
                if not (lo <= q <= hi):
                    break
                if pv.key(q) not in self.cache:
                    # A block along the run where the encoder gains from batches (PyTorch, CUDA: full
                    # batches, not one new slice per step); one slice where it does not (encode_ahead 1:
                    # OpenVINO, ONNX Runtime), so that no slice past the one where the run stops is encoded.
                    pv.encode(self.cache, list(range(q, stop, step)[: self.backend.encode_ahead]))
                emb = self.cache.get(pv.key(q))
                decoded = []
                for piece in pieces:
                    if not piece.alive:
                        continue
                    got = self._segment_piece(pv, piece, emb, q, abs(q - origin), gen, rules, shape_rules, stoppable)
                    if got is None:
                        if stoppable:
                            piece.alive = False
                            log.debug("a piece's extent stops before slice %d", q)
                        continue
                    decoded.append(got)
                if not decoded:
                    if stoppable:
                        log.debug("extent stops before slice %d", q)
                        break
                    tick()
                    continue
                union = np.zeros(pv.slices.shape[1:], bool)
                for piece, prompts, score, mmask, logits, hole_pts in decoded:
                    union |= pv.frame.to_native(logits) > 0
                    piece.neighbour = mmask
                out[q] = union
                self._merge_pieces(pieces, rules, shape_rules)
                result.prompts[q] = self._slice_prompts(axis, q, [(d[1], d[2], d[5]) for d in decoded], origin)
                result.scores[q] = float(np.mean([d[2] for d in decoded]))
                tick()

        if release_embeddings:
            self.cache.drop_memory()
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

    # ---- pieces and holes -----------------------------------------------------------------------
    def _pieces(self, support: Support, layout, rules: ExtentRules, shape_rules: ShapeRules) -> list[_Piece]:
        """The pieces followed from one painted slice: one per piece of its layout (the whole mask when
        it is one piece or when per-piece prompting is off), each with the holes it encloses."""
        size = self.backend.input_size
        if not shape_rules.per_piece or len(layout.pieces) <= 1:
            parts = [(support.mask, list(layout.holes))]
        else:
            parts = [(m, layout.holes_of(i)) for i, m in enumerate(layout.pieces)]
        out = []
        for m, hs in parts:
            sup = Support(support.embedding, m, support.slice_index)
            out.append(_Piece(sup, TargetEvidence(sup, rules.ring, size), m.copy(),
                              hs if (shape_rules.hole_points or shape_rules.subtract_holes) else []))
        return out

    def _segment_piece(self, pv: PreparedVolume, piece: _Piece, emb, q: int, distance: int, gen: PromptGenerator,
                       rules: ExtentRules, shape_rules: ShapeRules, stoppable: bool):
        """Prompt, decode and (in automatic extent) check one piece on query slice ``q``.

        Returns (piece, prompts, score, model mask, model logits, hole points) or None when the piece
        has nothing to prompt or, in automatic extent, ends before this slice."""
        ctx = QueryContext(piece.neighbour, pv.valid, q, distance)
        prompts = gen.generate(piece.support, emb, ctx, self.backend)
        if prompts.is_empty:
            return None
        hole_pts = np.zeros((0, 2), np.float32)
        if shape_rules.hole_points and piece.holes:
            hole_pts = _stack_points([inner_point(h) for h in piece.holes])
            prompts = Prompts(prompts.fg_points, _stack_points([prompts.bg_points, hole_pts]), prompts.box,
                              prompts.presence, prompts.mask_input)
        res = self.backend.decode(emb, prompts)
        logits = np.where(pv.valid, res.logits, -20.0).astype(np.float32)
        mmask = logits > 0
        new_holes = piece.holes
        if piece.holes and mmask.any():
            new_holes, removed = self._follow_holes(pv, emb, mmask, piece.holes, shape_rules)
            if removed.any():
                logits[removed] = np.minimum(logits[removed], -1.0)
                mmask &= ~removed
        if stoppable and not (
                self._accept(mmask, res.score, prompts.presence, piece.neighbour, piece.support.mask, rules)
                and piece.evidence.score(emb, mmask) > rules.min_evidence):
            return None
        piece.holes = new_holes
        return piece, prompts, float(res.score), mmask, logits, hole_pts

    def _follow_holes(self, pv: PreparedVolume, emb, mask: np.ndarray, previous: list, shape_rules: ShapeRules
                      ) -> tuple[list, np.ndarray]:
        """Where the piece's holes are on this slice, and which pixels of ``mask`` to remove.

        A hole SAM left open is taken as it is; a hole SAM filled is decoded as its own target (a box
        around the previous slice's hole and a point at its centre) and removed from the mask when the
        answer is a plausible hole (near the previous one, much smaller than the piece)."""
        from scipy import ndimage

        from .prompts.boxprop import mask_box

        scale = self.backend.input_size / 256.0
        found = holes(mask, max(1, int(round(shape_rules.min_hole_pixels * scale * scale))))
        removed = np.zeros_like(mask)
        out = []
        for prev in previous:
            match = [h for h in found if (h & prev).any()]
            if match:
                out.append(np.logical_or.reduce(match))
                continue
            if not shape_rules.subtract_holes:
                out.append(prev)
                continue
            near = ndimage.binary_dilation(prev, iterations=max(1, int(round(shape_rules.hole_reach * scale))))
            box = mask_box(prev, shape_rules.hole_box_margin * scale, mask.shape)
            res = self.backend.decode(emb, Prompts(fg_points=inner_point(prev)[None], box=box))
            hm = res.mask & pv.valid & near
            area = int(hm.sum())
            if (area and area <= shape_rules.max_hole_fraction * int(fill_holes(mask).sum())
                    and overlap_fraction(hm, prev) >= 0.3):
                removed |= hm & mask
                out.append(hm)
            else:
                out.append(prev)
        return out, removed

    def _merge_pieces(self, pieces: list[_Piece], rules: ExtentRules, shape_rules: ShapeRules) -> None:
        """Pieces that have grown into each other (e.g. two lobes that join) continue as one."""
        alive = [p for p in pieces if p.alive]
        for i, a in enumerate(alive):
            for b in alive[i + 1:]:
                if a.alive and b.alive and overlap_fraction(a.neighbour, b.neighbour) > shape_rules.merge_overlap:
                    a.support = Support(a.support.embedding, a.support.mask | b.support.mask, a.support.slice_index)
                    a.evidence = TargetEvidence(a.support, rules.ring, self.backend.input_size)
                    a.neighbour = a.neighbour | b.neighbour
                    a.holes = a.holes + b.holes
                    b.alive = False

    def _slice_prompts(self, axis: int, q: int, items: list, support: int) -> SlicePrompts:
        """SlicePrompts of one slice from its pieces' (model prompts, score, hole points)."""
        frame = self.prepared(axis).frame
        parts = []
        for prompts, score, hole_pts in items:
            sp = self.to_slice_prompts(axis, q, prompts, score, support)
            if len(hole_pts):
                sp.hole_bg = slice_to_volume_index(axis, q, frame.points_to_native(hole_pts))
            parts.append(sp)
        if len(parts) == 1:
            return parts[0]
        boxes = [p.box for p in parts if p.box is not None]
        return SlicePrompts(q, np.concatenate([p.fg for p in parts]), np.concatenate([p.bg for p in parts]),
                            np.concatenate(boxes) if boxes else None, float(np.mean([p.score for p in parts])),
                            float(np.mean([p.presence for p in parts])), int(support), parts[0].model,
                            pieces=parts, hole_bg=np.concatenate([p.hole_bg for p in parts]))

    @single_threaded_blas()
    def segment_from_prompts(self, example_mask: np.ndarray, axis: int, prompts: dict[int, dict], *,
                             progress: Optional[Progress] = None,
                             cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
        """SAM's result for given (e.g. edited) prompts: ``prompts[slice] = {'fg', 'bg', 'box'}`` in
        numpy-order voxel indices. Only those slices are decoded; painted slices stay as painted.

        A target in pieces is given either as ``'pieces': [{'fg', 'bg', 'box', 'hole_bg'}, ...]`` (each
        piece decoded with its own prompts; ``hole_bg`` lists which of its ``bg`` points lie in holes) or as
        one entry whose ``box`` holds two corners per piece (points go to the box that holds them)."""
        t0 = time.perf_counter()
        example = np.asarray(example_mask, dtype=bool)
        pv = self.prepared(axis)
        painted = painted_slices(example, axis).tolist()
        out = np.zeros((pv.n_slices,) + pv.slices.shape[1:], bool)
        result = SegmentationResult(mask=example, axis=axis, painted=painted, intensity=self.intensity)
        order = sorted(prompts)
        pv.encode(self.cache, order)
        for done, k in enumerate(order, 1):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            p = prompts[k]
            support = min(painted, key=lambda s: abs(s - k))
            if p.get("pieces"):
                parts = [(self.prompts_from_voxels(axis, pp["fg"], pp["bg"], pp.get("box")), pp) for pp in p["pieces"]]
            else:
                mp = self.prompts_from_voxels(axis, p["fg"], p["bg"], p.get("box"))
                parts = [(m, p) for m in (mp if isinstance(mp, list) else [mp])]
            items = []
            out[k] = False
            for mp, given in parts:
                for m in (mp if isinstance(mp, list) else [mp]):  # several boxes in one piece: each its own
                    mask2d, score = self.decode_slice(axis, k, m)
                    out[k] |= mask2d
                    items.append((m, score, self._hole_points_of(axis, m, given)))
            result.prompts[k] = self._slice_prompts(axis, k, items, support)
            result.scores[k] = float(np.mean([it[1] for it in items])) if items else 0.0
            if progress is not None:
                progress(done, len(order))
        ex_slices = np.moveaxis(example, axis, 0)
        for p in painted:
            out[p] = ex_slices[p]
        result.mask = np.moveaxis(out, 0, axis)
        result.seconds = time.perf_counter() - t0
        return result

    def _hole_points_of(self, axis: int, prompts: Prompts, given: Optional[dict]) -> np.ndarray:
        """The background points of ``prompts`` that the caller marked as lying in holes
        (``given['hole_bg']``, voxel indices), in the model frame."""
        if not given or given.get("hole_bg") is None or not len(given["hole_bg"]) or not len(prompts.bg_points):
            return np.zeros((0, 2), np.float32)
        frame = self.prepared(axis).frame
        marked = frame.points_to_model(volume_index_to_slice(axis, np.asarray(given["hole_bg"], float))[1])
        d = np.abs(prompts.bg_points[:, None, :] - marked[None, :, :]).max(-1).min(1)
        return prompts.bg_points[d < 1e-3]

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
                   generator: Union[str, PromptGenerator] = DEFAULT_GENERATOR, sam=DEFAULT_SAM,
                   device: str = "auto", extent: Extent = "auto", intensity: Optional[Intensity] = None,
                   metadata: Optional[dict] = None, progress: Optional[Progress] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
    """Segment the target painted in ``example_mask`` on every slice of ``image`` (one-call API)."""
    session = VolumeSession(image, spacing, sam=sam, device=device, intensity=intensity, metadata=metadata)
    return session.segment(example_mask, generator=generator, extent=extent, progress=progress, cancel=cancel)
