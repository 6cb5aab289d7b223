"""The volume engine: the one loop over slices that the command line, the Slicer module and the
evaluation harness all use.

numpy in, numpy out, no file I/O: ``segment_volume(image, spacing, example_mask, ...)`` propagates
outward from the painted slice(s), each query slice prompted from its nearest painted slice, finds the
target's extent automatically (``extent.py``) or takes a forced range, and keeps the 3D result connected
to the example. ``VolumeSession`` keeps the backend, the prepared slices and the embedding cache so that
several segments, and re-runs of single slices after a prompt edit, never re-encode a slice.

Why one file of about 620 lines: the steps of ``VolumeSession.segment`` (``plan_runs``, the encoding along
a run, ``_follow_run``, ``_segment_piece``, ``_assemble``), the pieces and holes of a target
(``FollowedPiece``, ``PieceAnswer``, ``_follow_holes``, ``_merge_pieces``) and the re-run of edited prompts
all work on one session's state (prepared slices, embedding cache, backend) and share the result types;
what stands on its own is elsewhere: the extent rules in ``extent.py``, the 2D mask helpers in
``shape.py``, the prepared slices in ``slices.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from .errors import CancelledError, UserInputError
from .corrections import (CLICK_SPREAD, changes_at_points, clear_around, nearest_answer,
                          previous_answer_of_piece, tissue_like_clicks, within_nearby)
from .extent import Extent, ExtentRules, TargetEvidence, accept_slice, resolve_extent
from .prompt_types import Prompts, QueryContext, SlicePrompts, Support
from .prompts import DEFAULT_GENERATOR, make_generator
from .prompts.base import PromptGenerator
from .sam.names import DEFAULT_SAM
from .sam.backend import DecodeResult
from .threads import single_threaded_blas
from .shape import (ShapeRules, analyse_slice, fill_holes, holes, inner_point, mask_box, overlap_fraction,
                    pixels_inside, widened_box)
from .slices import OUTSIDE_LOGIT, PreparedVolume
from .volume import (Intensity, choose_axis, choose_intensity, normalise, painted_slices, slice_to_volume_index,
                     volume_index_to_slice)

log = logging.getLogger(__name__)

BOX_GROWTH_STEPS = 3  # times a growing box is widened on one slice (prompts.boxprop.BOX_GROWTH pixels each)

Progress = Callable[[int, int], None]
__all__ = ["Extent", "ExtentRules", "FollowedPiece", "PieceAnswer", "Run", "SegmentationResult", "SlicePrompts",
           "TargetEvidence", "VolumeSession", "keep_connected_to", "plan_runs", "segment_volume", "split_by_boxes"]


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
    generator: str = ""  # the generator that made the prompts (``auto`` resolved), "" for given prompts

    @property
    def segmented_slices(self) -> list[int]:
        """Slices with a non-empty result (painted ones included)."""
        other = tuple(a for a in range(3) if a != self.axis)
        return np.flatnonzero(self.mask.any(axis=other)).tolist()


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


class Run(NamedTuple):
    """One propagation run: slices ``start``, ``start + step``, ... up to ``stop`` (excluded), prompted
    from the painted slice ``origin`` just before ``start``."""

    start: int
    stop: int
    step: int  # +1 or -1
    stoppable: bool  # automatic extent may end the run

    @property
    def origin(self) -> int:
        """The painted slice the run starts from."""
        return self.start - self.step


def plan_runs(painted: Sequence[int], lo: int, hi: int, forced: bool) -> list[Run]:
    """The runs outward from the painted slices (sorted) within ``lo``..``hi``: beyond the last and before
    the first (stoppable unless the range is ``forced``), and between two painted slices each half from
    its own side (never stopped early)."""
    runs = [Run(painted[-1] + 1, hi + 1, 1, not forced), Run(painted[0] - 1, lo - 1, -1, not forced)]
    for a, b in zip(painted[:-1], painted[1:]):
        mid = (a + b) // 2
        runs.append(Run(a + 1, mid + 1, 1, False))
        runs.append(Run(b - 1, mid, -1, False))
    return runs


@dataclass
class FollowedPiece:
    """One piece of the target followed outward from a painted slice (its own prompts and extent)."""

    support: Support  # the painted slice's embedding with this piece's mask
    evidence: TargetEvidence
    neighbour: np.ndarray  # model-frame mask of the piece on the last accepted slice
    holes: list  # model-frame masks of the piece's holes on the last accepted slice
    alive: bool = True


class PieceAnswer(NamedTuple):
    """SAM's answer for one piece of the target on one slice (model frame)."""

    prompts: Prompts
    score: float
    hole_points: np.ndarray  # (K, 2) background points placed in the piece's holes (part of prompts.bg_points)
    logits: Optional[np.ndarray] = None  # (S, S) float32, OUTSIDE_LOGIT outside the image (propagation only)


class _Ticker:
    """Progress ``(done, total)`` after each slice and the cancel check."""

    def __init__(self, total: int, progress: Optional[Progress], cancel: Optional[Callable[[], bool]]) -> None:
        self.total, self.done, self.progress, self.cancel = total, 0, progress, cancel

    def check_cancel(self) -> None:
        """CancelledError when the caller asked to stop."""
        if self.cancel is not None and self.cancel():
            raise CancelledError("cancelled")

    def tick(self, k: int = 1) -> None:
        """``k`` more slices done: report, then honour a cancel."""
        self.done += k
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        self.check_cancel()


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

    # a corrective re-run (``segment_from_prompts`` with ``previous``) keeps only the changes at its points,
    # each within ``click_spread`` times its distance to the answer's edge (``corrections.changes_at_points``)
    local_corrections: bool = True
    click_spread: Optional[float] = CLICK_SPREAD
    # a click takes the tissue that looks like it, near it (``corrections.tissue_like_clicks``)
    click_tissue: bool = True
    # a click SAM's re-run does not follow still acts (``VolumeSession._follow_ignored_clicks``)
    click_fallback: bool = True
    # a click on a slice without an answer stays near the nearest answered slice's (``corrections.within_nearby``)
    click_nearby: bool = True

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
        if not boxes and len(corners):  # a single stray corner: its box is the min/max of the corners given
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
            logits = np.where(pv.valid, res.logits, OUTSIDE_LOGIT)
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
        spinal canal inside a vertebra) are followed, and decoded and removed where SAM fills them
        (a background point in each hole only with ``ShapeRules(hole_points=True)``). ``shape`` says what
        counts as a piece or a hole and switches these off.

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
        gen = make_generator(generator, sam=self.backend.name)
        rules = rules or ExtentRules()
        axis = choose_axis(example, self.spacing) if axis is None else int(axis)
        pv = self.prepared(axis)
        painted = painted_slices(example, axis).tolist()
        ex_slices = np.moveaxis(example, axis, 0)
        lo, hi, forced = resolve_extent(extent, pv.n_slices)
        ticker = _Ticker(max(1, hi - lo + 1), progress, cancel)
        ticker.check_cancel()

        # Supports: the painted slices, encoded first, and the pieces and holes of each.
        supports: dict[int, Support] = {}
        for p, emb in zip(painted, pv.embeddings(self.cache, painted)):
            supports[p] = Support(emb, pv.mask_to_model(ex_slices[p]), p)
        scale = self.backend.input_size / 256.0
        layouts = {p: analyse_slice(supports[p].mask, shape_rules, scale) for p in painted}

        out = np.zeros((pv.n_slices,) + pv.slices.shape[1:], bool)
        for p in painted:
            out[p] = ex_slices[p]
        result = SegmentationResult(mask=np.zeros((0, 0, 0), bool), axis=axis, painted=painted,
                                    intensity=self.intensity, generator=gen.name)  # the mask is set at the end
        for run in plan_runs(painted, lo, hi, forced):
            if not (lo <= run.start <= hi) or run.origin not in supports:
                continue
            pieces = self._pieces(supports[run.origin], layouts[run.origin], rules, shape_rules)
            self._follow_run(pv, run, pieces, lo, hi, gen, rules, shape_rules, out, result, ticker)

        if release_embeddings:
            self.cache.drop_memory()
        result.mask = self._assemble(out, example, axis, painted, connected)
        result.seconds = time.perf_counter() - t0
        return result

    def _embedding_along(self, pv: PreparedVolume, q: int, run: Run):
        """The embedding of slice ``q`` of ``run``, encoding it first if the cache lacks it: a block along
        the run where the encoder gains from batches (PyTorch, CUDA: full batches, not one new slice per
        step); one slice where it does not (encode_ahead 1: OpenVINO, ONNX Runtime), so that no slice past
        the one where the run stops is encoded."""
        if pv.key(q) not in self.cache:
            pv.encode(self.cache, list(range(q, run.stop, run.step)[: self.backend.encode_ahead]))
        return self.cache.get(pv.key(q))

    def _follow_run(self, pv: PreparedVolume, run: Run, pieces: list[FollowedPiece], lo: int, hi: int,
                    gen: PromptGenerator, rules: ExtentRules, shape_rules: ShapeRules, out: np.ndarray,
                    result: SegmentationResult, ticker: _Ticker) -> None:
        """Segment the slices of ``run`` within ``lo``..``hi``, piece by piece, into ``out`` (slices first)
        and ``result``'s prompts and scores, until every piece has ended (automatic extent)."""
        for q in range(run.start, run.stop, run.step):
            if not (lo <= q <= hi):
                break
            emb = self._embedding_along(pv, q, run)
            answers = []
            for piece in pieces:
                if not piece.alive:
                    continue
                got = self._segment_piece(pv, piece, emb, q, abs(q - run.origin), gen, rules, shape_rules,
                                          run.stoppable)
                if got is None:
                    if run.stoppable:
                        piece.alive = False
                        log.debug("a piece's extent stops before slice %d", q)
                    continue
                answers.append(got)
            if not answers:
                if run.stoppable:
                    log.debug("extent stops before slice %d", q)
                    break
                ticker.tick()
                continue
            union = np.zeros(pv.slices.shape[1:], bool)
            for answer in answers:
                union |= pv.frame.to_native(answer.logits) > 0
            out[q] = union
            self._merge_pieces(pieces, rules, shape_rules)
            result.prompts[q] = self._slice_prompts(pv.axis, q, answers, run.origin)
            result.scores[q] = float(np.mean([a.score for a in answers]))
            ticker.tick()

    @staticmethod
    def _assemble(out: np.ndarray, example: np.ndarray, axis: int, painted: Sequence[int], connected: bool
                  ) -> np.ndarray:
        """The image-shaped mask from the per-slice answers ``out`` (slices first): kept connected to the
        example (when ``connected``), painted slices exactly as painted."""
        mask = np.moveaxis(out, 0, axis)
        if connected:
            mask = keep_connected_to(mask, example)
        for p in painted:
            sl = [slice(None)] * 3
            sl[axis] = p
            mask[tuple(sl)] = np.moveaxis(example, axis, 0)[p]
        return mask

    # ---- pieces and holes -----------------------------------------------------------------------
    def _pieces(self, support: Support, layout, rules: ExtentRules, shape_rules: ShapeRules) -> list[FollowedPiece]:
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
            out.append(FollowedPiece(sup, TargetEvidence(sup, rules.ring, size), m.copy(),
                                     hs if (shape_rules.hole_points or shape_rules.subtract_holes) else []))
        return out

    def _segment_piece(self, pv: PreparedVolume, piece: FollowedPiece, emb, q: int, distance: int,
                       gen: PromptGenerator, rules: ExtentRules, shape_rules: ShapeRules, stoppable: bool
                       ) -> Optional[PieceAnswer]:
        """Prompt, decode and (in automatic extent) check one piece on query slice ``q``.

        Returns the piece's answer, the piece moved on to this slice (its neighbour mask and holes), or
        None when the piece has nothing to prompt or, in automatic extent, ends before this slice."""
        ctx = QueryContext(piece.neighbour, pv.valid, q, distance)
        prompts = gen.generate(piece.support, emb, ctx, self.backend)
        if prompts.is_empty:
            return None
        hole_pts = np.zeros((0, 2), np.float32)
        if shape_rules.hole_points and piece.holes:
            hole_pts = _stack_points([inner_point(h) for h in piece.holes])
            prompts = replace(prompts, bg_points=_stack_points([prompts.bg_points, hole_pts]))
        prompts, res = self._decode_growing_box(emb, prompts, pv)
        logits = np.where(pv.valid, res.logits, OUTSIDE_LOGIT).astype(np.float32)
        mmask = logits > 0
        new_holes = piece.holes
        if piece.holes and mmask.any():
            new_holes, removed = self._follow_holes(pv, emb, mmask, piece.holes, shape_rules)
            if removed.any():
                logits[removed] = np.minimum(logits[removed], -1.0)
                mmask &= ~removed
        if stoppable and not (
                accept_slice(mmask, res.score, prompts.presence, piece.neighbour, piece.support.mask, rules)
                and piece.evidence.score(emb, mmask) > rules.min_evidence):
            return None
        piece.holes = new_holes
        piece.neighbour = mmask
        return PieceAnswer(prompts, float(res.score), hole_pts, logits)

    def _decode_growing_box(self, emb, prompts: Prompts, pv: PreparedVolume) -> tuple[Prompts, DecodeResult]:
        """Decode ``prompts``; while the answer reaches a side of a box that may grow (``box_growth``), widen
        those sides (within the image, ``pv.valid_box``) and decode again, at most ``BOX_GROWTH_STEPS`` times.
        Returns the prompts with the box used and that box's answer."""
        res = self.backend.decode(emb, prompts)
        if prompts.box is None or prompts.box_growth <= 0:
            return prompts, res
        for _ in range(BOX_GROWTH_STEPS):
            box = widened_box(res.mask & pv.valid, prompts.box, prompts.box_growth, pv.valid_box)
            if box is None:
                break
            prompts = replace(prompts, box=box)
            res = self.backend.decode(emb, prompts)
        return prompts, res

    def _follow_holes(self, pv: PreparedVolume, emb, mask: np.ndarray, previous: list, shape_rules: ShapeRules
                      ) -> tuple[list, np.ndarray]:
        """Where the piece's holes are on this slice, and which pixels of ``mask`` to remove.

        A hole SAM left open is taken as it is; a hole SAM filled is decoded as its own target (a box
        around the previous slice's hole and a point at its centre) and removed from the mask when the
        answer is a plausible hole (near the previous one, much smaller than the piece)."""
        from scipy import ndimage

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

    def _merge_pieces(self, pieces: list[FollowedPiece], rules: ExtentRules, shape_rules: ShapeRules) -> None:
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

    def _slice_prompts(self, axis: int, q: int, answers: Sequence[PieceAnswer], support: int) -> SlicePrompts:
        """SlicePrompts of one slice from its pieces' answers."""
        frame = self.prepared(axis).frame
        parts = []
        for answer in answers:
            sp = self.to_slice_prompts(axis, q, answer.prompts, answer.score, support)
            if len(answer.hole_points):
                sp.hole_bg = slice_to_volume_index(axis, q, frame.points_to_native(answer.hole_points))
            parts.append(sp)
        if len(parts) == 1:
            return parts[0]
        boxes = [p.box for p in parts if p.box is not None]
        return SlicePrompts(q, np.concatenate([p.fg for p in parts]), np.concatenate([p.bg for p in parts]),
                            np.concatenate(boxes) if boxes else None, float(np.mean([p.score for p in parts])),
                            float(np.mean([p.presence for p in parts])), int(support), parts[0].model,
                            pieces=parts, hole_bg=np.concatenate([p.hole_bg for p in parts]))

    @single_threaded_blas()
    def segment_from_prompts(self, example_mask: np.ndarray, axis: int,
                             prompts: Mapping[int, Union[SlicePrompts, Mapping]], *,
                             previous: Optional[np.ndarray] = None, progress: Optional[Progress] = None,
                             cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
        """SAM's result for given (e.g. edited) prompts: ``prompts[slice]`` a SlicePrompts (``fg``, ``bg``,
        ``box`` in numpy-order voxel indices; an engine answer's prompts work as they are) or, at the edge,
        a dict ``{'fg', 'bg', 'box'}`` (see ``SlicePrompts.from_dict``). Only those slices are decoded;
        painted slices stay as painted.

        ``previous`` (bool, image shape) is the segmentation being corrected: a backend trained to read
        it (``SamBackend.previous_answer_input``) gets each slice's previous answer with that slice's points,
        so a corrective click changes the answer near the click instead of re-deciding the whole slice.

        A target in pieces is given either with ``pieces`` (each piece decoded with its own prompts; its
        ``hole_bg`` lists which of its ``bg`` points lie in holes) or as one entry whose ``box`` holds two
        corners per piece (points go to the box that holds them)."""
        t0 = time.perf_counter()
        example = np.asarray(example_mask, dtype=bool)
        pv = self.prepared(axis)
        painted = painted_slices(example, axis).tolist()
        out = np.zeros((pv.n_slices,) + pv.slices.shape[1:], bool)
        result = SegmentationResult(mask=example, axis=axis, painted=painted, intensity=self.intensity)
        edits = {k: p if isinstance(p, SlicePrompts) else SlicePrompts.from_dict(k, p) for k, p in prompts.items()}
        order = sorted(edits)
        pv.encode(self.cache, order)
        before = np.moveaxis(previous, axis, 0) if previous is not None else None
        for done, k in enumerate(order, 1):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            sp = edits[k]
            support = min(painted, key=lambda s: abs(s - k))
            given_parts = sp.pieces or [sp]
            parts = [(self.prompts_from_voxels(axis, pp.fg, pp.bg, pp.box), pp) for pp in given_parts]
            answers = []
            out[k] = False
            # several boxes in one entry: each its own
            flat = [(m, given) for mp, given in parts for m in (mp if isinstance(mp, list) else [mp])]
            if before is not None:
                decoded = self.with_previous_answer(axis, [m for m, _ in flat], before[k])
                flat = [(m, given) for m, (_, given) in zip(decoded, flat)]
            for m, given in flat:
                mask2d, score = self.decode_slice(axis, k, m)
                out[k] |= mask2d
                answers.append(PieceAnswer(m, score, self._hole_points_of(axis, m, given.hole_bg)))
            if before is not None and (len(sp.fg) or len(sp.bg)):
                nearby = nearest_answer(before, k) if not before[k].any() else None
                out[k] = self.corrected_slice(axis, before[k], out[k], sp.fg, sp.bg, index=k, nearby=nearby)
            result.prompts[k] = self._slice_prompts(axis, k, answers, support)
            result.scores[k] = float(np.mean([a.score for a in answers])) if answers else 0.0
            if progress is not None:
                progress(done, len(order))
        ex_slices = np.moveaxis(example, axis, 0)
        for p in painted:
            out[p] = ex_slices[p]
        result.mask = np.moveaxis(out, 0, axis)
        result.seconds = time.perf_counter() - t0
        return result

    def corrected_slice(self, axis: int, previous2d: np.ndarray, new2d: np.ndarray, fg: np.ndarray,
                        bg: np.ndarray, index: Optional[int] = None,
                        nearby: Optional[np.ndarray] = None) -> np.ndarray:
        """A slice's answer after a correction: ``previous2d`` changed only where the points ``fg`` / ``bg``
        (voxel indices) ask (``changes_at_points``), with the tissue like each click taken
        (``corrections.tissue_like_clicks``; needs the slice ``index``), then the clicks SAM did not follow
        applied (``_follow_ignored_clicks``; the foreground ones need ``index``); on a slice without an
        answer kept near ``nearby``, the nearest answered slice's answer (``corrections.within_nearby``).
        ``new2d`` as it is when ``local_corrections`` is off."""
        if not self.local_corrections:
            return np.asarray(new2d, bool)
        fg2 = volume_index_to_slice(axis, np.asarray(fg, float).reshape(-1, 3))[1]
        bg2 = volume_index_to_slice(axis, np.asarray(bg, float).reshape(-1, 3))[1]
        out = changes_at_points(previous2d, new2d, fg2, bg2, spread=self.click_spread)
        if self.click_tissue and index is not None:
            before = np.asarray(previous2d, bool)
            like = tissue_like_clicks(before, fg2, bg2, self._normalised_slice(axis, index))
            out = (out | (like & ~before)) & ~(before & ~like)
        if self.click_fallback:
            out = self._follow_ignored_clicks(axis, index, out, fg2, bg2)
        if self.click_nearby and not np.any(previous2d):
            out = within_nearby(out, nearby)
        return out

    def _normalised_slice(self, axis: int, index: int) -> np.ndarray:
        """Native slice ``index`` across ``axis`` in the session's intensity window, [0, 1]."""
        return normalise(self.prepared(axis).slices[int(index)], self.intensity)

    def _follow_ignored_clicks(self, axis: int, index: Optional[int], answer: np.ndarray, fg: np.ndarray,
                               bg: np.ndarray) -> np.ndarray:
        """``answer`` (native slice) with the clicks that SAM's re-run did not follow applied anyway: a
        foreground point (rows, cols) still outside it adds SAM's answer to that point alone, where it holds
        the point and within the click spread (when the slice ``index`` is known); a background point still
        inside it clears a disk around it (``corrections.clear_around``)."""
        out = np.asarray(answer, bool)
        if index is not None and len(fg):
            frame = self.prepared(axis).frame
            for r, c in pixels_inside(fg, out.shape):
                if not out[r, c]:
                    point = frame.points_to_model(np.array([[r, c]], float))
                    alone, _score = self.decode_slice(axis, index, Prompts(fg_points=point))
                    out = changes_at_points(out, out | alone, np.array([[r, c]]), np.zeros((0, 2)),
                                            spread=self.click_spread)
        return clear_around(out, bg) if len(bg) else out

    def with_previous_answer(self, axis: int, prompts: Sequence[Prompts], previous2d: np.ndarray) -> list[Prompts]:
        """One slice's prompts (one per piece) with the slice's previous answer (bool, native slice) as
        mask input, where the backend reads one and the prompts carry points (a box alone keeps the
        box answer). With several pieces each sees only the previous answer's parts at its box or points."""
        if not any(len(p.fg_points) or len(p.bg_points) for p in prompts):
            return list(prompts)
        before = self.prepared(axis).mask_to_model(previous2d)
        out = []
        for p in prompts:
            if len(p.fg_points) or len(p.bg_points):
                given = self.backend.previous_answer_input(
                    previous_answer_of_piece(before, p) if len(prompts) > 1 else before)
                if given is None:  # the decoder does not read previous answers
                    return list(prompts)
                p = replace(p, mask_input=given)
            out.append(p)
        return out

    def correct_slice(self, axis: int, index: int, prompts: Union[Prompts, Sequence[Prompts]],
                      previous2d: np.ndarray, fg: np.ndarray, bg: np.ndarray,
                      nearby: Optional[np.ndarray] = None) -> np.ndarray:
        """A slice's answer to a correction: ``prompts`` decoded with the slice's previous answer
        ``previous2d`` as mask input (``with_previous_answer``), then changed only where the added points
        ``fg`` / ``bg`` (voxel indices) ask (``corrected_slice``; ``nearby``: the nearest answered slice's
        answer, for a slice without one). Native slice, bool."""
        parts = [prompts] if isinstance(prompts, Prompts) else list(prompts)
        new, _score = self.decode_slice(axis, index, self.with_previous_answer(axis, parts, previous2d))
        return self.corrected_slice(axis, previous2d, new, fg, bg, index=index, nearby=nearby)

    def _hole_points_of(self, axis: int, prompts: Prompts, hole_bg: Optional[np.ndarray]) -> np.ndarray:
        """The background points of ``prompts`` that the caller marked as lying in holes (``hole_bg``,
        voxel indices), in the model frame."""
        if hole_bg is None or not len(hole_bg) or not len(prompts.bg_points):
            return np.zeros((0, 2), np.float32)
        frame = self.prepared(axis).frame
        marked = frame.points_to_model(volume_index_to_slice(axis, np.asarray(hole_bg, float))[1])
        d = np.abs(prompts.bg_points[:, None, :] - marked[None, :, :]).max(-1).min(1)
        return prompts.bg_points[d < 1e-3]


def segment_volume(image: np.ndarray, spacing: Sequence[float], example_mask: np.ndarray, *,
                   generator: Union[str, PromptGenerator] = DEFAULT_GENERATOR, sam=DEFAULT_SAM,
                   device: str = "auto", extent: Extent = "auto", intensity: Optional[Intensity] = None,
                   metadata: Optional[dict] = None, progress: Optional[Progress] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> SegmentationResult:
    """Segment the target painted in ``example_mask`` on every slice of ``image`` (one-call API)."""
    session = VolumeSession(image, spacing, sam=sam, device=device, intensity=intensity, metadata=metadata)
    return session.segment(example_mask, generator=generator, extent=extent, progress=progress, cancel=cancel)
