"""The console batch API (``SegmentFromExampleLogic.segmentFromExample``, which the Slicer Logic class
inherits) and the worker that runs the engine off the GUI thread.

A run changes the scene only after the engine finished. While it runs, the scene is watched: closing it or
removing the input volume or segmentation cancels the run (nothing is written), and closing a scene
releases everything kept for it (sessions with their embeddings, prompt editors, undo entries).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import vtk

import slicer

from FewShotSAMLib.errors import CancelledError, UserInputError
from FewShotSAMLib.options import RuntimeOptions
from FewShotSAMLib.sam.names import BACKEND_NAMES, DEFAULT_SAM

from .dependencies import (check_python_version, install_dependencies, missing_modules, slicer_install_torch,
                           slicer_pip)
from .editing import OutputState, PromptEditor, UndoStack
from .geometry import check_volume, volume_array, volume_spacing
from .labelmaps import add_output_segment, check_same_frame, get_segment, segment_mask, set_segment_mask
from .markups import (ATTRIBUTE_PREFIX, SlicePoints, create_prompt_lists, place_beside_volume, remove_node,
                      write_prompt_points)

log = logging.getLogger(__name__)

# What the panel offers a clinician: the generators that serve them (auto picks the one measured best for
# the model) and the SAM models that work without a checkpoint of one's own. Every generator and model
# stays available from the console (segmentFromExample) and the command line.
PANEL_GENERATORS = ("auto", "fob", "boxprop")
RESEARCH_SAM = ("vit_h", "vit_l", "vit_b")  # SAM ViT: a checkpoint the user supplies, research baselines
PANEL_SAM_MODELS = tuple(name for name in BACKEND_NAMES if name not in RESEARCH_SAM)


def resolve_generator(name: Optional[str], sam: Optional[str] = None) -> str:
    """The generator to run: 'auto' (or nothing) is the one that measured best with the SAM model ``sam``
    (``FewShotSAMLib.prompts.recommended_generator``); 'fob' without FoB installed falls back to it (logged)."""
    from FewShotSAMLib.prompts import available_generators, recommended_generator

    available = available_generators()
    name = (name or "auto").lower()
    if name == "auto":
        return recommended_generator(sam)
    if name == "fob" and "fob" not in available:
        fallback = recommended_generator(sam)
        log.warning("The FoB prompt generator is not installed; using '%s' instead.", fallback)
        return fallback
    if name not in available:
        raise UserInputError(f"Unknown prompt generator '{name}'; choose auto or one of {', '.join(available)}.")
    return name


def default_generator() -> str:
    """The panel's default: 'auto' (the generator that measured best for the chosen SAM model)."""
    return "auto"


def parse_extent(extent) -> Union[str, tuple]:
    """'auto' | (first, last) | 'first:last' | 'first-last' -> 'auto' or an (int, int) slice range."""
    if extent is None or (isinstance(extent, str) and extent.strip().lower() in ("", "auto", "automatic")):
        return "auto"
    if isinstance(extent, str):
        for sep in (":", "-", ","):
            if sep in extent:
                a, b = extent.split(sep, 1)
                try:
                    return int(a), int(b)
                except ValueError:
                    break
        raise UserInputError(f"The extent '{extent}' is not 'auto' nor a slice range like '10:25'.")
    try:
        a, b = extent
        return int(a), int(b)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"The extent {extent!r} is not 'auto' nor a (first, last) slice range.") from exc


def _remove_observers(scene_ref: weakref.ref, tags: list) -> None:
    """Remove the observers ``tags`` from the scene, when it still exists."""
    scene = scene_ref()
    for tag in tags if scene is not None else ():
        scene.RemoveObserver(tag)


class SegmentFromExampleLogic:
    """Segment a whole volume from one painted example: MRML in, a segment and prompt point lists out.

    ``pump_events`` (set by the panel to ``slicer.app.processEvents``) makes the engine run in a worker
    thread while the GUI thread keeps processing events; without it the engine runs in the caller's
    thread (console, tests). ``embedding_cache_dir`` keeps embeddings on disk between runs when set;
    ``weights_folder`` (set by the module to Slicer's cache folder) receives downloaded weights unless
    FEWSHOTSAM_CACHE names another folder.
    ``on_rerun(slices, seconds)`` and ``on_error(exception)`` are told what a point edit did or raised.
    """

    def __init__(self) -> None:
        self.undo_stack = UndoStack()
        self.editors: dict = {}  # (segmentation node ID, segment ID) -> PromptEditor
        self.sessions: dict = {}
        self.max_sessions = 2
        self.pump_events: Optional[Callable[[], None]] = None
        self.embedding_cache_dir: Optional[str] = None
        self.weights_folder: Optional[str] = None
        self.on_rerun: Optional[Callable[[list, float], None]] = None
        self.on_error: Optional[Callable[[Exception], None]] = None
        self.last_result = None
        self.last_generator = ""
        self.busy = False
        self._watched: dict = {}  # scene address -> (weak reference to the scene, its observers' remover)
        self._run_inputs: tuple = ()  # the nodes a run in progress reads
        self._stop_reason: Optional[str] = None

    # ---- the scene: cancel a run whose inputs go away, release what a closed scene used ----------------
    def watch_scene(self, scene) -> None:
        """Observe ``scene`` (once): closing it cancels a run and releases what was kept for it; removing
        a run's input node cancels the run. The observers hold the logic and the scene weakly, so neither
        keeps the other alive."""
        key = scene.GetAddressAsString("vtkMRMLScene")
        if key in self._watched and self._watched[key][0]() is scene:
            return
        me = weakref.ref(self)

        def on_close(caller, event) -> None:
            logic = me()
            if logic is not None:
                logic._on_scene_close(caller)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_removed(caller, event, node) -> None:
            logic = me()
            if logic is not None and node is not None:
                logic._on_node_removed(node)

        tags = [scene.AddObserver(scene.StartCloseEvent, on_close),
                scene.AddObserver(scene.NodeAboutToBeRemovedEvent, on_removed)]
        if key in self._watched:  # an earlier scene at the same address
            self._watched.pop(key)[1]()
        # the observers go with the logic (a console or self-test logic nobody cleans up) or on unwatch_scenes()
        remove = weakref.finalize(self, _remove_observers, weakref.ref(scene), tags)
        remove.atexit = False  # at exit the scene goes too
        self._watched[key] = (weakref.ref(scene), remove)

    def unwatch_scenes(self) -> None:
        """Stop observing every scene (the module's cleanup)."""
        for _ref, remove in self._watched.values():
            remove()
        self._watched.clear()

    def _on_scene_close(self, scene) -> None:
        if self._run_inputs and self._stop_reason is None:
            self._stop_reason = "the scene was closed"
        self.release(scene)

    def _on_node_removed(self, node) -> None:
        if self._stop_reason is None and any(node is n for n in self._run_inputs):
            self._stop_reason = f"'{node.GetName()}' was removed from the scene"
        node_id = node.GetID()
        # the segmentation's editors, or those of segments made from the volume (with its session)
        for key in [k for k, e in self.editors.items() if k[0] == node_id or e.state.volume_node is node]:
            self.editors.pop(key).unobserve()
        self.undo_stack.forget(lambda e: (e.segment is None or e.segment[0] is not node) and e.volume is not node)
        for key in [k for k in self.sessions if k[0] == node_id]:
            del self.sessions[key]

    def release(self, scene=None) -> None:
        """Let go of everything kept for ``scene`` (every scene when None): the sessions with their
        embeddings, the prompt editors and their observers, the undo entries, the last result."""
        def in_scene(node) -> bool:
            return scene is None or node is None or node.GetScene() is None or node.GetScene() is scene

        for key in [k for k, e in self.editors.items() if in_scene(e.state.segmentation_node)]:
            self.editors.pop(key).unobserve()
        self.undo_stack.forget(lambda e: e.segment is not None and not in_scene(e.segment[0]))
        self.sessions.clear()  # keyed by node IDs, which do not say their scene: a cache, rebuilt on demand
        self.last_result = None

    # ---- sessions -------------------------------------------------------------------------------
    def runtime_options(self) -> RuntimeOptions:
        """The library's options for a new session: the FEWSHOTSAM_* environment variables, read here (so a
        variable set in Slicer's Python console applies to the next session), over this logic's defaults."""
        defaults = RuntimeOptions(weights_dir=Path(self.weights_folder)) if self.weights_folder else None
        return RuntimeOptions.from_environment(defaults=defaults)

    def session_for(self, volume_node, image: np.ndarray, sam: str = DEFAULT_SAM, device: str = "auto"):
        """The VolumeSession of this volume's current voxels and this SAM model (made once)."""
        from FewShotSAMLib.engine import VolumeSession

        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), str(sam), str(device))
        if key not in self.sessions:
            options = self.runtime_options()
            cache = None
            if self.embedding_cache_dir:
                from FewShotSAMLib.sam import load_backend
                from FewShotSAMLib.sam.cache import EmbeddingCache

                backend = load_backend(sam, device, options=options)
                cache = EmbeddingCache(backend, persist_dir=self.embedding_cache_dir, options=options)
                sam = backend
            modality = volume_node.GetAttribute("DICOM.Modality")
            session = VolumeSession(image, volume_spacing(volume_node), sam=sam, device=device, cache=cache,
                                    metadata={"modality": modality} if modality else None, options=options)
            while len(self.sessions) >= self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[key] = session
        return self.sessions[key]

    # ---- Python packages ------------------------------------------------------------------------
    def installDependencies(self, confirm: Optional[Callable[[str], bool]] = None,
                            progress: Optional[Callable[[str, int, int], None]] = None,
                            install_torch: Optional[Callable[[], None]] = None,
                            pip: Optional[Callable[[list, str], None]] = None,
                            modules: Optional[dict] = None, version_info=None) -> bool:
        """Install the missing Python packages (``dependencies.install_dependencies``): True when all import,
        False when ``confirm`` declined; an old Python or a failed installation raises UserInputError (one
        sentence for the panel). ``install_torch`` and ``pip`` default to Slicer's PyTorch extension and
        pip helpers."""
        return install_dependencies(install_torch or slicer_install_torch, pip or slicer_pip, confirm=confirm,
                                    progress=progress, modules=modules, version_info=version_info)

    # ---- running the engine ---------------------------------------------------------------------
    def _run(self, work: Callable, progress, cancel, inputs: tuple = ()):
        """Run ``work(progress, cancel)``; in a worker thread while pumping GUI events when asked. The run
        stops (CancelledError) when the scene of ``inputs`` closes or one of them is removed."""
        for node in inputs:
            if node.GetScene() is not None:
                self.watch_scene(node.GetScene())
        self._run_inputs, self._stop_reason = tuple(inputs), None

        def stop() -> bool:
            return self._stop_reason is not None or (cancel is not None and bool(cancel()))

        try:
            if self.pump_events is None:
                result = work(progress, stop)
            else:
                self.busy = True
                result = self._run_in_worker(work, progress, stop)
            if stop():  # asked for after the last slice: nothing is written all the same
                raise CancelledError("cancelled")
        except CancelledError:
            if self._stop_reason is not None:
                raise CancelledError(f"Stopped: {self._stop_reason} during the run; nothing was written.") from None
            raise
        finally:
            self.busy = False
            self._run_inputs = ()
        if any(node.GetScene() is None for node in inputs):
            raise CancelledError("Stopped: an input left the scene during the run; nothing was written.")
        return result

    def _run_in_worker(self, work: Callable, progress, cancel):
        shared = {"done": 0, "total": 0, "shown": None}
        stop = threading.Event()
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["result"] = work(lambda d, t: shared.update(done=d, total=t), stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed back to the GUI thread
                outcome["error"] = exc

        def cancelled() -> bool:
            # once asked for, the worker stops at its next slice boundary: the slices it finishes meanwhile
            # (those of one poll interval, 30 ms) are neither reported nor written
            if cancel is not None and not stop.is_set() and cancel():
                stop.set()
            return stop.is_set()

        worker = threading.Thread(target=target, name="FewShotSAM", daemon=True)
        worker.start()
        while True:
            finished = not worker.is_alive()
            self.pump_events()  # once more after the worker finished: a Cancel clicked meanwhile counts
            if not cancelled() and progress is not None and (shared["done"], shared["total"]) != shared["shown"]:
                shared["shown"] = (shared["done"], shared["total"])
                progress(shared["done"], shared["total"])
            if finished:
                break
            worker.join(0.03)
        error = outcome.get("error")
        if cancelled() and (error is None or isinstance(error, CancelledError)):
            raise CancelledError("cancelled")  # even when the worker finished first: nothing is written
        if error is not None:
            raise error
        return outcome["result"]

    # ---- the API --------------------------------------------------------------------------------
    def segmentFromExample(self, volumeNode, segmentationNode, segmentId: str, generator: str = "auto",
                           sam: str = DEFAULT_SAM, device: str = "auto", extent="auto", showPrompts: bool = True,
                           outputSegmentId: Optional[str] = None,
                           progress: Optional[Callable[[int, int], None]] = None,
                           cancel: Optional[Callable[[], bool]] = None) -> str:
        """Segment in ``volumeNode`` the target painted as ``segmentId`` of ``segmentationNode`` and return
        the ID of the output segment (a new one, or ``outputSegmentId`` overwritten).

        The painted segment is never altered. Raises UserInputError for input the user can fix and
        CancelledError when ``cancel()`` turns True; in both cases the scene is left as it was.
        """
        t0 = time.perf_counter()
        check_python_version()
        missing = missing_modules()
        if missing:
            raise UserInputError(
                f"Missing Python packages ({', '.join(sorted(set(missing.values())))}); install them from the "
                "module panel or with FewShotSAM.FewShotSAMLogic().installDependencies().")
        check_volume(volumeNode)
        example_segment = get_segment(segmentationNode, segmentId)
        check_same_frame(volumeNode, segmentationNode)
        if outputSegmentId:
            if outputSegmentId == segmentId:
                raise UserInputError("The output segment is the painted example; choose another segment to "
                                     "overwrite or create a new one (the example is never altered).")
            get_segment(segmentationNode, outputSegmentId)
        generator = resolve_generator(generator, sam if isinstance(sam, str) else None)
        extent = parse_extent(extent)
        image = volume_array(volumeNode)
        example = segment_mask(segmentationNode, segmentId, volumeNode)
        if not example.any():
            raise UserInputError(f"The example segment '{example_segment.GetName()}' is empty: paint the target "
                                 "on at least one slice of this volume.")
        session = self.session_for(volumeNode, image, sam, device)

        def work(p, c):
            return session.segment(example, generator=generator, extent=extent, progress=p, cancel=c)

        result = self._run(work, progress, cancel, (volumeNode, segmentationNode))
        # ---- from here on the scene changes (nothing above touched it) ----
        return self._write_result(volumeNode, segmentationNode, segmentId, outputSegmentId, result, session,
                                  example, generator, sam, showPrompts, time.perf_counter() - t0)

    def _write_result(self, volumeNode, segmentationNode, segmentId, outputSegmentId, result, session, example,
                      generator, sam, showPrompts, seconds) -> str:
        seg = segmentationNode.GetSegmentation()
        example_segment = seg.GetSegment(segmentId)
        ref_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        had_geometry = bool(seg.GetConversionParameter(ref_name))
        old_geometry = seg.GetConversionParameter(ref_name)
        if not had_geometry:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        key_old = (segmentationNode.GetID(), outputSegmentId) if outputSegmentId else None
        old_editor = self.editors.get(key_old) if key_old else None
        old_points = old_editor.current_points() if old_editor else None
        if outputSegmentId:
            out_id = outputSegmentId
            before = segment_mask(segmentationNode, out_id, volumeNode)
        else:
            out_id = add_output_segment(segmentationNode, f"{example_segment.GetName()} (from example)",
                                        example_segment.GetColor())
            before = None
        out_segment = seg.GetSegment(out_id)
        set_segment_mask(segmentationNode, out_id, volumeNode, result.mask)
        out_segment.SetTag(ATTRIBUTE_PREFIX + "Generator", generator)
        out_segment.SetTag(ATTRIBUTE_PREFIX + "SAM", str(sam if isinstance(sam, str) else getattr(sam, "name", sam)))
        out_segment.SetTag(ATTRIBUTE_PREFIX + "Example", segmentId)
        place_beside_volume(segmentationNode, volumeNode)

        points = {k: SlicePoints(p.fg, p.bg) for k, p in result.prompts.items()}
        boxes = {k: p.box for k, p in result.prompts.items()}
        painted = {k: np.take(example, k, axis=result.axis).copy() for k in result.painted}
        state = OutputState(volumeNode, segmentationNode, out_id, session, result.axis, boxes, points, painted,
                            generator=generator)
        if old_editor is not None:
            old_editor.unobserve()
            state.fg_node, state.bg_node = old_editor.state.fg_node, old_editor.state.bg_node
        editor = PromptEditor(state, self.undo_stack, self._rerun_done, lambda: self.busy, self._edit_failed)
        if showPrompts:
            if state.fg_node is None:
                state.fg_node, state.bg_node = create_prompt_lists(volumeNode, segmentationNode, out_id)
                editor.created_lists = [state.fg_node, state.bg_node]
            write_prompt_points(state.fg_node, state.bg_node, volumeNode, points)
        key = (segmentationNode.GetID(), out_id)
        self.editors[key] = editor
        if showPrompts:
            editor.observe()

        def restore() -> None:
            editor.unobserve()
            self.editors.pop(key, None)
            for node in editor.created_lists:
                remove_node(node)
            if before is None:
                seg.RemoveSegment(out_id)
            else:
                set_segment_mask(segmentationNode, out_id, volumeNode, before)
            if old_editor is not None:
                self.editors[key_old] = old_editor
                if old_editor.state.fg_node is not None:
                    with old_editor.blocked():
                        write_prompt_points(old_editor.state.fg_node, old_editor.state.bg_node, volumeNode, old_points)
                    old_editor.observe()
            if not had_geometry:
                seg.SetConversionParameter(ref_name, old_geometry or "")

        self.undo_stack.push("segmentation run", restore, (segmentationNode, out_id), volumeNode)
        self.last_result = result
        self.last_generator = generator
        log.info("segment '%s': %d slices in %.1f s (%s, %s)", out_segment.GetName(),
                 len(result.segmented_slices), seconds, generator, sam)
        return out_id

    def _rerun_done(self, slices: list, seconds: float) -> None:
        if self.on_rerun is not None:
            self.on_rerun(slices, seconds)

    def _edit_failed(self, error: Exception) -> None:
        if self.on_error is None:
            log.error("re-running the edited slice failed: %s", error)
        else:
            self.on_error(error)

    # ---- edits ----------------------------------------------------------------------------------
    def editor(self, segmentationNode, segmentId: str) -> Optional[PromptEditor]:
        """The prompt editor of an output segment made in this session (None otherwise)."""
        return self.editors.get((segmentationNode.GetID(), segmentId)) if segmentationNode else None

    def rerunAll(self, segmentationNode, segmentId: str) -> list:
        """Re-run every prompted slice of an output segment from its current points."""
        editor = self.editor(segmentationNode, segmentId)
        if editor is None:
            raise UserInputError("This segment was not made by 'Segment volume' in this session; run it first.")
        return editor.rerun_all()

    def undo(self) -> Optional[str]:
        """Restore the segment (and its points) as before the last run or edit. Raises UserInputError when
        the segment was changed elsewhere since (the Segment Editor's undo is the one to use then)."""
        return self.undo_stack.undo()

    def promptPointList(self, segmentationNode, segmentId: str, role: str):
        """The point list a place-point button of ``role`` ('foreground' or 'background') fills for an output
        segment made in this session (made now when the run showed no prompts)."""
        editor = self.editor(segmentationNode, segmentId)
        if editor is None:
            raise UserInputError("This segment was not made by 'Segment volume' in this session; run it first.")
        return editor.point_list(role)
