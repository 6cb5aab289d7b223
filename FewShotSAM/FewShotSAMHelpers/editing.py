"""Prompt editing and undo: the re-run of exactly the slices whose points the user changed, and an undo that
never overwrites an edit made elsewhere (the Segment Editor's undo keeps those)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

import slicer

from FewShotSAMLib.corrections import nearest_answer
from FewShotSAMLib.errors import UserInputError

from .labelmaps import labelmap_stamp, segment_content_hash, segment_mask, segment_slices, write_segment_slices
from .markups import (ROLES, SlicePoints, create_prompt_lists, read_prompt_points, relabel_point_list,
                      write_point_list, write_prompt_points)

log = logging.getLogger(__name__)


@dataclass
class UndoEntry:
    """How to put things back as they were before one run or edit of one output segment."""

    description: str
    restore: Callable[[], None]
    segment: Optional[tuple] = None  # (segmentation node, segment ID) that the change wrote
    volume: object = None  # the input volume node the segment was made from


def _segment_key(segment: tuple) -> tuple:
    node, segment_id = segment
    return (node.GetID() if node is not None else None, segment_id)


class UndoStack:
    """Last-in first-out restore actions, at most ``depth`` of them.

    After every write of the module into a segment the stack records the segment's labelmap stamp
    (:func:`labelmaps.labelmap_stamp`) and the hash of its voxels (:func:`labelmaps.segment_content_hash`).
    An undo is refused, with one sentence, when the segment's voxels changed since (painted, erased or undone
    in the Segment Editor), so the module never overwrites an edit made there. A stamp that changed with the
    voxels unchanged (a save collapsed the labelmap layers into new objects, or the module wrote another
    segment of the same layer) does not refuse it.
    """

    def __init__(self, depth: int = 10) -> None:
        self.depth = depth
        self.entries: list[UndoEntry] = []
        # (segmentation node ID, segment ID) -> (labelmap stamp, voxel hash) after the module's last write
        self._stamps: dict = {}

    def push(self, description: str, restore: Callable[[], None], segment: Optional[tuple] = None,
             volume: object = None) -> None:
        """Remember how to undo the change just made to ``segment`` ((segmentation node, segment ID)) from
        ``volume`` (the input volume node it was made from)."""
        self.entries.append(UndoEntry(description, restore, segment, volume))
        del self.entries[:-self.depth]
        if segment is not None:
            self.record(segment)

    def record(self, segment: tuple) -> None:
        """Note the segment's voxels as the module just wrote them, and note again the other tracked segments
        of the same labelmap layer whose voxels are still those noted (the write touched their layer only)."""
        node, _segment_id = segment
        key = _segment_key(segment)
        stamp = labelmap_stamp(*segment)
        self._stamps[key] = (stamp, segment_content_hash(*segment))
        if stamp is None or stamp[0] is None:
            return
        for other, (other_stamp, other_hash) in list(self._stamps.items()):
            if other == key or other[0] != key[0]:
                continue
            now = labelmap_stamp(node, other[1])
            if now is not None and now[0] == stamp[0] and now != other_stamp \
                    and segment_content_hash(node, other[1]) == other_hash:
                self._stamps[other] = (now, other_hash)

    def changed_elsewhere(self, segment: tuple) -> bool:
        """True when the segment's voxels are no longer those the module last wrote."""
        key = _segment_key(segment)
        if key not in self._stamps:
            return True
        stamp, content = self._stamps[key]
        now = labelmap_stamp(*segment)
        if now == stamp:
            return False
        if now is None or segment_content_hash(*segment) != content:
            return True
        self._stamps[key] = (now, content)  # same voxels in another labelmap object: compared once
        return False

    def forget(self, keep: Callable[[UndoEntry], bool]) -> None:
        """Drop the entries for which ``keep(entry)`` is False."""
        self.entries = [e for e in self.entries if keep(e)]

    def clear(self) -> None:
        """Drop every entry."""
        self.entries.clear()
        self._stamps.clear()

    @property
    def can_undo(self) -> bool:
        """True when there is something to undo."""
        return bool(self.entries)

    def undo(self) -> Optional[str]:
        """Undo the last change; returns its description (None when there was nothing to undo).

        Raises UserInputError, and drops that segment's entries, when the segment was changed elsewhere since
        the module wrote it."""
        if not self.entries:
            return None
        entry = self.entries[-1]
        if entry.segment is not None and self.changed_elsewhere(entry.segment):
            key = _segment_key(entry.segment)
            self.forget(lambda e: e.segment is None or _segment_key(e.segment) != key)
            node, segment_id = entry.segment
            segment = node.GetSegmentation().GetSegment(segment_id) if node is not None else None
            name = segment.GetName() if segment is not None else segment_id
            raise UserInputError(
                f"The segment '{name}' was changed outside this module since its last run or point edit, so this "
                "Undo would overwrite that change; use the Segment Editor's Undo instead.")
        self.entries.pop()
        entry.restore()
        if entry.segment is not None:
            self.record(entry.segment)
        return entry.description


@dataclass
class OutputState:
    """Everything needed to re-run single slices of one output segment."""

    volume_node: object
    segmentation_node: object
    segment_id: str
    session: object  # FewShotSAMLib.engine.VolumeSession
    axis: int
    boxes: dict  # slice -> (2, 3) numpy-order box corners or None
    points: dict  # slice -> SlicePoints the segment was made from
    painted: dict  # painted slice -> its 2D example mask
    fg_node: object = None
    bg_node: object = None
    generator: str = ""


def added_points(before: Optional[SlicePoints], now: SlicePoints, tol: float = 1e-3) -> Optional[SlicePoints]:
    """The points of ``now`` that ``before`` lacks when ``now`` only adds points to ``before`` (every
    earlier point still in place); None when a point was moved or deleted."""
    before = before or SlicePoints()
    out = []
    for old, new in ((before.fg, now.fg), (before.bg, now.bg)):
        old, new = np.asarray(old, float).reshape(-1, 3), np.asarray(new, float).reshape(-1, 3)
        matched = np.zeros(len(new), bool)
        for p in old:
            d = np.abs(new - p).max(1) if len(new) else np.zeros(0)
            hit = np.flatnonzero((d < tol) & ~matched)
            if not len(hit):
                return None
            matched[hit[0]] = True
        out.append(new[~matched])
    return SlicePoints(out[0], out[1])


class PromptEditor:
    """Observes the two point lists of one output segment; when the user releases a moved point, adds or
    deletes one, re-decodes exactly the slices whose points changed (from the cached embeddings) and
    writes those slices into the segment. ``on_rerun(slices, seconds)`` is told after each re-run;
    ``on_error(exception)`` gets what a re-run started by an edit raised (VTK observers cannot raise to
    anyone), else it is logged."""

    def __init__(self, state: OutputState, undo: UndoStack,
                 on_rerun: Optional[Callable[[list, float], None]] = None,
                 busy: Optional[Callable[[], bool]] = None,
                 on_error: Optional[Callable[[Exception], None]] = None) -> None:
        self.state = state
        self.undo = undo
        self.on_rerun = on_rerun
        self.busy = busy  # True while a whole-volume run uses the model in a worker thread
        self.on_error = on_error
        self.created_lists: list = []  # point lists made for this output (removed by the run's undo)
        self._last_error: Optional[tuple] = None
        self._tags: list = []
        self._interacting: set = set()
        self._blocked = 0
        self.last_rerun: list = []
        self.last_seconds = 0.0

    # ---- observers ------------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        """True while the point lists are observed: they then hold the segment's prompts and edits of them
        re-run slices. Otherwise the prompts are those recorded in ``state.points``."""
        return bool(self._tags)

    def observe(self) -> None:
        """Start reacting to the user's edits of the point lists: a drag re-runs when the point is
        released (PointEndInteractionEvent); adding, deleting, placing or editing a point outside a drag
        (e.g. in the Markups table) re-runs at once."""
        self.unobserve()
        M = slicer.vtkMRMLMarkupsNode
        handlers = {
            M.PointStartInteractionEvent: self._on_start,
            M.PointEndInteractionEvent: self._on_end,
            M.PointModifiedEvent: self._on_modified,
            M.PointAddedEvent: self._on_changed,
            M.PointRemovedEvent: self._on_changed,
            M.PointPositionDefinedEvent: self._on_changed,
        }
        for node in (self.state.fg_node, self.state.bg_node):
            if node is None:
                continue
            for event, handler in handlers.items():
                self._tags.append((node, node.AddObserver(event, handler)))

    def unobserve(self) -> None:
        """Stop reacting to edits."""
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []

    def blocked(self):
        """Context manager: programmatic changes to the lists inside it trigger no re-run."""
        editor = self

        class _Block:
            def __enter__(self):
                editor._blocked += 1

            def __exit__(self, *exc):
                editor._blocked -= 1
                return False

        return _Block()

    def _on_start(self, caller, event) -> None:
        self._interacting.add(caller.GetID())

    def _on_end(self, caller, event) -> None:
        self._interacting.discard(caller.GetID())
        if not self._blocked:
            self._sync_reporting_errors()

    def _on_modified(self, caller, event) -> None:
        if not self._blocked and caller.GetID() not in self._interacting:  # while dragged: wait for the release
            self._sync_reporting_errors()

    def _on_changed(self, caller, event) -> None:
        if not self._blocked:
            self._sync_reporting_errors()

    def _points_key(self) -> Optional[tuple]:
        """The points now in the lists as a hashable value (None when they cannot be read)."""
        try:
            now = self.current_points()
        except Exception:  # noqa: BLE001 - only tells edits apart
            return None
        return tuple(sorted((k, np.asarray(p.fg, float).tobytes(), np.asarray(p.bg, float).tobytes())
                            for k, p in now.items()))

    def _sync_reporting_errors(self) -> None:
        """sync() for the observers: one edit fires several events (added, position defined, modified), so
        an error is handed on once for an edit, not again for the same edit's next events; a later edit
        (other points in the lists) that fails the same way is reported again."""
        try:
            self.sync()
            self._last_error = None
        except Exception as exc:  # noqa: BLE001 - an observer has no caller to raise to: hand it on
            key = (type(exc), str(exc), self._points_key())
            if key == self._last_error:
                return
            self._last_error = key
            if self.on_error is None:
                log.exception("re-running the edited slice failed")
            else:
                self.on_error(exc)

    # ---- the place-point buttons ----------------------------------------------------------------
    def point_list(self, role: str):
        """The point list that the place-point button of ``role`` ('foreground' or 'background') adds
        points to. When the lists are not observed (the run showed no prompts) they are made now if missing
        (or an earlier run's lists are reused), filled with the prompts the segment was made from, and
        observed."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        s = self.state
        if any(n is None or n.GetScene() is None for n in (s.fg_node, s.bg_node)):
            self.unobserve()
            s.fg_node, s.bg_node = create_prompt_lists(s.volume_node, s.segmentation_node, s.segment_id)
            self.created_lists += [s.fg_node, s.bg_node]
        if not self.observing:
            with self.blocked():
                write_prompt_points(s.fg_node, s.bg_node, s.volume_node, s.points)
            self.observe()
        return s.fg_node if role == ROLES[0] else s.bg_node

    # ---- re-run ---------------------------------------------------------------------------------
    def current_points(self) -> dict:
        """The prompt points per slice: those now in the lists while they are observed, else those the
        segment was made from (unobserved lists may hold an earlier run's points)."""
        s = self.state
        if not self.observing:
            return {k: SlicePoints(p.fg, p.bg) for k, p in s.points.items()}
        return read_prompt_points(s.fg_node, s.bg_node, s.volume_node, s.axis)

    def changed_slices(self, now: Optional[dict] = None) -> list:
        """Slices whose points differ from those the segment was made from (``now``: the current points,
        read from the lists when not given)."""
        now = self.current_points() if now is None else now
        before = self.state.points
        empty = SlicePoints()
        return sorted(k for k in set(now) | set(before) if not now.get(k, empty).same_as(before.get(k, empty)))

    def sync(self) -> list:
        """Re-run the slices whose points changed; returns them. While a whole-volume run is busy the
        edit waits (it is picked up by the next edit or by Re-run all)."""
        if self.busy is not None and self.busy():
            return []
        t0 = time.perf_counter()
        now = self.current_points()
        changed = self.changed_slices(now)
        if changed:
            self.rerun(changed, "edit of the prompt points", now=now, started=t0)
        return changed

    def rerun(self, slices: Sequence[int], description: str = "re-run", now: Optional[dict] = None,
              started: Optional[float] = None) -> None:
        """Re-decode ``slices`` from the current points (undoable). ``now``: the current points when the
        caller has just read them; ``started``: when the caller's timing of the edit began."""
        s = self.state
        t0 = time.perf_counter() if started is None else started
        now = self.current_points() if now is None else now
        slices = sorted(set(int(k) for k in slices))
        before_slices = segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, slices)
        before_points = dict(s.points)
        # The lists as they were before this edit: the recorded points of the changed slices, the
        # current ones elsewhere.
        prev_fg = {k: p.fg for k, p in now.items() if k not in slices and len(p.fg)}
        prev_bg = {k: p.bg for k, p in now.items() if k not in slices and len(p.bg)}
        for k in slices:
            if k in before_points:
                prev_fg[k] = before_points[k].fg
                prev_bg[k] = before_points[k].bg

        new: dict[int, np.ndarray] = {}
        segment = None  # the whole segment, slices first: read once, when a slice without an answer is corrected
        for k in slices:
            pts = now.get(k, SlicePoints())
            if k in s.painted and not len(pts.fg) and not len(pts.bg):
                new[k] = s.painted[k]
                continue
            box = s.boxes.get(k)
            if box is None and k in s.painted:
                rows, cols = np.nonzero(s.painted[k])
                if rows.size:
                    from FewShotSAMLib.volume import slice_to_volume_index

                    box = slice_to_volume_index(s.axis, k, [[rows.min(), cols.min()], [rows.max(), cols.max()]])
            prompts = s.session.prompts_from_voxels(s.axis, pts.fg, pts.bg, box)
            added = added_points(before_points.get(k), pts)
            if added is None or not (len(added.fg) or len(added.bg)):
                # a point moved or deleted, or a re-run without a new point: SAM answers the slice afresh
                new[k] = s.session.decode_slice(s.axis, k, prompts)[0]
                continue
            # points only added: a correction of the segment as it is now (SAM's answer or painted by
            # hand), which SAM sees and which changes only where the new points ask; on a slice without
            # an answer SAM's answer stays near the nearest answered slice's
            nearby = None
            if not before_slices[k].any():
                if segment is None:
                    segment = np.moveaxis(segment_mask(s.segmentation_node, s.segment_id, s.volume_node), s.axis, 0)
                nearby = nearest_answer(segment, k)
            new[k] = s.session.correct_slice(s.axis, k, prompts, before_slices[k], added.fg, added.bg,
                                             nearby=nearby)
        write_segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, new)
        s.points = {k: v for k, v in s.points.items() if k not in slices}
        for k in slices:
            if k in now:
                s.points[k] = now[k]
            else:
                s.points.pop(k, None)
        if self.observing:
            with self.blocked():
                for node in (s.fg_node, s.bg_node):
                    relabel_point_list(node, s.volume_node, s.axis)

        def restore() -> None:
            write_segment_slices(s.segmentation_node, s.segment_id, s.volume_node, s.axis, before_slices)
            if self.observing:  # unobserved lists are filled from s.points when next observed
                with self.blocked():
                    write_point_list(s.fg_node, s.volume_node, prev_fg)
                    write_point_list(s.bg_node, s.volume_node, prev_bg)
            s.points = before_points

        self.undo.push(f"{description} on slice(s) {', '.join(map(str, slices))}", restore,
                       (s.segmentation_node, s.segment_id), s.volume_node)
        self.last_rerun = slices
        self.last_seconds = time.perf_counter() - t0
        log.info("re-ran slice(s) %s in %.3f s", slices, self.last_seconds)
        if self.on_rerun is not None:
            self.on_rerun(slices, self.last_seconds)

    def rerun_all(self) -> list:
        """Re-run every slice that has prompts (current points, recorded boxes)."""
        slices = sorted(set(self.current_points()) | set(self.state.points) | set(self.state.boxes))
        if slices:
            self.rerun(slices, "re-run of all slices")
        return slices

