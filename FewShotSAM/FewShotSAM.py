"""3D Slicer module "Segment from one example": paint one slice, segment the whole organ with SAM.

A thin layer over FewShotSAMLib: the panel and the module boilerplate live here; everything that touches
MRML (and the console batch API) lives in the helper package FewShotSAMHelpers, which runs without Qt.
"""

import logging
import os
import time
import traceback
from typing import Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from FewShotSAMHelpers.geometry import index_to_ras
from FewShotSAMHelpers.logic import PANEL_GENERATORS, PANEL_SAM_MODELS, SegmentFromExampleLogic, default_generator
from FewShotSAMHelpers.markups import start_placing

from FewShotSAMLib.errors import CancelledError, UserInputError
from FewShotSAMLib.sam.names import DEFAULT_SAM

HELP = """Segment a whole organ in a CT or MRI volume from one painted slice.<br>
1. Load a volume and paint the organ on one slice with the Segment Editor.<br>
2. Here, select the volume and the painted segment.<br>
3. Click <b>Segment volume</b>: a new segment covers the organ on every slice.<br>
4. Green (foreground) and red (background) points show SAM's prompts on each slice: drag, add or delete one
and that slice is re-segmented when you release it.<br>
5. <b>Add foreground point</b> / <b>Add background point</b>: click in a slice view to add one; its slice is
re-segmented.<br>
6. <b>Undo</b> restores the segment as before the last run or edit (refused when the segment was edited since in
the Segment Editor: use its Undo then); <b>Re-run all</b> re-segments every slice from the current points.<br>
Batch from the Python console: <code>FewShotSAM.FewShotSAMLogic().segmentFromExample(volume, segmentation,
segmentId)</code>. See docs/SLICER.md of the extension.
"""


#
# Module
#
class FewShotSAM(ScriptedLoadableModule):
    """The module's description for Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment from one example"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["FewShotSAM developers (FewShotSAM)"]
        self.parent.helpText = HELP
        self.parent.acknowledgementText = (
            "Uses SAM / LiteMedSAM (MedSAM) prompted from one painted example. "
            "See the extension's documentation for the models' licences and papers.")


#
# Parameter node
#
@parameterNodeWrapper
class FewShotSAMParameterNode:
    """The panel's state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    exampleSegmentId: str = ""
    overwriteOutput: bool = False
    outputSegmentId: str = ""
    generator: str = ""
    samModel: str = DEFAULT_SAM
    device: str = "auto"
    automaticExtent: bool = True
    firstSlice: int = 0
    lastSlice: int = 0
    showPrompts: bool = True


#
# Widget
#
class FewShotSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._updatingGUI = False
        self._lastOutput = None  # (segmentation node, segment ID) of the last run

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FewShotSAMLogic()
        self.logic.pump_events = slicer.app.processEvents  # run the engine off the GUI thread
        self.logic.on_rerun = self.onSliceRerun
        self.logic.on_error = self.onEditError

        self._fillModelChoices()
        self.ui.exampleSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onExampleNodeChanged)
        self.ui.exampleSegmentSelector.connect("currentSegmentChanged(QString)", self.onExampleSegmentChanged)
        self.ui.outputSegmentSelector.connect("currentSegmentChanged(QString)", self.onOutputSegmentChanged)
        self.ui.overwriteRadioButton.connect("toggled(bool)", self.onOverwriteToggled)
        self.ui.generatorComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        self.ui.samModelComboBox.connect("currentTextChanged(QString)", self.onModelChoiceChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        self.ui.samBrowseButton.connect("clicked(bool)", self.onBrowseCheckpoint)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.rerunAllButton.connect("clicked(bool)", self.onRerunAllButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.addForegroundPointButton.connect("clicked(bool)", lambda checked: self.onPlacePoint("foreground"))
        self.ui.addBackgroundPointButton.connect("clicked(bool)", lambda checked: self.onPlacePoint("background"))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def _fillModelChoices(self) -> None:
        """The generators and SAM models that serve clinicians (the research baselines stay available from
        the console and the command line; the model box also takes a checkpoint path)."""
        self.ui.generatorComboBox.clear()
        for name in PANEL_GENERATORS:
            self.ui.generatorComboBox.addItem(name)
        self.ui.generatorComboBox.setCurrentText(default_generator())
        self.ui.samModelComboBox.clear()
        for name in PANEL_SAM_MODELS:
            self.ui.samModelComboBox.addItem(name)

    # ---- life cycle -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.release()
            self.logic.unwatch_scenes()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.release(slicer.mrmlScene)  # also done by the logic's own scene observer during a run
        self._lastOutput = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                p.inputVolume = first
        if not p.segmentationNode:
            p.segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        if not p.generator:
            p.generator = self.ui.generatorComboBox.currentText

    def setParameterNode(self, inputParameterNode: Optional[FewShotSAMParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ---- parameter node <-> the widgets not bound by parameterNodeWrapper ---------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            self.ui.exampleSegmentSelector.setCurrentNode(p.segmentationNode)
            if p.exampleSegmentId:
                self.ui.exampleSegmentSelector.setCurrentSegmentID(p.exampleSegmentId)
            self.ui.outputSegmentSelector.setCurrentNode(p.segmentationNode)
            if p.outputSegmentId:
                self.ui.outputSegmentSelector.setCurrentSegmentID(p.outputSegmentId)
            self.ui.overwriteRadioButton.checked = p.overwriteOutput
            self.ui.newSegmentRadioButton.checked = not p.overwriteOutput
            if p.generator:
                if self.ui.generatorComboBox.findText(p.generator) < 0:  # set from the console or an older scene
                    self.ui.generatorComboBox.addItem(p.generator)
                self.ui.generatorComboBox.setCurrentText(p.generator)
            self.ui.samModelComboBox.setCurrentText(p.samModel or DEFAULT_SAM)
            self.ui.deviceComboBox.setCurrentText(p.device or "auto")
            self.ui.firstSliceSpinBox.enabled = not p.automaticExtent
            self.ui.lastSliceSpinBox.enabled = not p.automaticExtent
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateButtons(self) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.segmentationNode and p.exampleSegmentId)
        if ready and p.overwriteOutput:
            ready = bool(p.outputSegmentId) and p.outputSegmentId != p.exampleSegmentId
        self.ui.applyButton.enabled = ready and not self._running
        self.ui.applyButton.toolTip = ("Segment the whole volume from the painted example." if ready else
                                       "Select the input volume and the painted example segment first.")
        self.ui.cancelButton.enabled = self._running
        editing = not self._running and self._currentEditor() is not None
        self.ui.rerunAllButton.enabled = editing
        self.ui.addForegroundPointButton.enabled = editing
        self.ui.addBackgroundPointButton.enabled = editing
        self.ui.undoButton.enabled = not self._running and self.logic.undo_stack.can_undo

    def onExampleNodeChanged(self, node) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.segmentationNode = node
            self.ui.outputSegmentSelector.setCurrentNode(node)

    def onExampleSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.exampleSegmentId = segmentId or ""

    def onOutputSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.outputSegmentId = segmentId or ""

    def onOverwriteToggled(self, checked) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.overwriteOutput = bool(checked)

    def onModelChoiceChanged(self, *args) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.generator = self.ui.generatorComboBox.currentText
            self._parameterNode.samModel = self.ui.samModelComboBox.currentText.strip() or DEFAULT_SAM
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt);;All files (*)")
        if path:
            self.ui.samModelComboBox.setCurrentText(path)

    # ---- status ---------------------------------------------------------------------------------
    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = "color: #c0392b;" if error else ""
        if not error:
            slicer.util.showStatusMessage(text, 5000)

    def setRunning(self, running: bool) -> None:
        self._running = running
        for name in ("inputsCollapsibleButton", "outputCollapsibleButton", "modelCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
        if running:
            self.ui.progressBar.setValue(0)
        self.updateButtons()

    def onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setMaximum(max(1, total))
        self.ui.progressBar.setValue(done)
        self.ui.statusLabel.text = f"Segmenting: {done} of {total} slices ({time.time() - self._t0:.0f} s)"

    def onEditError(self, error: Exception) -> None:
        """A re-run started by a point edit failed: say so in the panel."""
        if isinstance(error, UserInputError):
            self.setStatus(str(error), error=True)
        else:
            self.setStatus(f"Re-segmenting the edited slice failed: {error}", error=True)
            slicer.util.errorDisplay(f"Re-segmenting the edited slice failed: {error}",
                                     detailedText="".join(traceback.format_exception(error)))
        self.updateButtons()

    def onSliceRerun(self, slices, seconds) -> None:
        self.setStatus(f"Re-segmented slice{'s' if len(slices) > 1 else ''} {', '.join(map(str, slices))} "
                       f"in {seconds * 1000:.0f} ms.")
        self.updateButtons()

    def _currentEditor(self):
        p = self._parameterNode
        if p and p.overwriteOutput and p.outputSegmentId:
            editor = self.logic.editor(p.segmentationNode, p.outputSegmentId)
            if editor is not None:
                return editor
        if self._lastOutput:
            node, segmentId = self._lastOutput
            return self.logic.editor(node, segmentId)
        return None

    # ---- actions --------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        try:
            if not self.logic.installDependencies(confirm=True):
                self.setStatus("The required Python packages are not installed; nothing was done.", error=True)
                return
        except UserInputError as exc:  # an old Python, a failed download: one sentence
            self.setStatus(str(exc), error=True)
            return
        p = self._parameterNode
        self._cancelRequested = False
        self._t0 = time.time()
        self.setRunning(True)
        try:
            extent = "auto" if p.automaticExtent else (p.firstSlice, p.lastSlice)
            with slicer.util.WaitCursor():
                outId = self.logic.segmentFromExample(
                    p.inputVolume, p.segmentationNode, p.exampleSegmentId,
                    generator=p.generator or default_generator(), sam=p.samModel or DEFAULT_SAM,
                    device=p.device or "auto", extent=extent, showPrompts=p.showPrompts,
                    outputSegmentId=p.outputSegmentId if p.overwriteOutput else None,
                    progress=self.onProgress, cancel=lambda: self._cancelRequested)
            result = self.logic.last_result
            self._lastOutput = (p.segmentationNode, outId)
            self.ui.progressBar.setValue(self.ui.progressBar.maximum)
            self.setStatus(f"Done: {len(result.segmented_slices)} slices segmented with {self.logic.last_generator} "
                           f"in {time.time() - self._t0:.1f} s.")
        except CancelledError as exc:  # Cancel, or the scene closed / an input removed during the run
            self.ui.progressBar.setValue(0)
            stopped = str(exc).startswith("Stopped:")
            self.setStatus(str(exc) if stopped else "Cancelled: the scene was left as it was.")
        except UserInputError as exc:
            self.setStatus(str(exc), error=True)
        except Exception as exc:  # noqa: BLE001 - shown to the user with the details
            logging.error(traceback.format_exc())
            self.setStatus(f"Segmentation failed: {exc}", error=True)
            slicer.util.errorDisplay(f"Segmentation failed: {exc}", detailedText=traceback.format_exc())
        finally:
            self.setRunning(False)

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.setStatus("Cancelling after the current slice...")

    def _tryInPanel(self, what: str, action):
        """Run ``action()``: a UserInputError becomes the status sentence, any other error the status line
        and Slicer's error dialog (``slicer.util.tryWithErrorDisplay``); returns its result (None on error)."""
        try:
            with slicer.util.tryWithErrorDisplay(f"{what} failed.", waitCursor=True):
                try:
                    return action()
                except UserInputError as exc:
                    self.setStatus(str(exc), error=True)
                    return None
        except Exception as exc:  # noqa: BLE001 - shown by tryWithErrorDisplay; the panel says it too
            self.setStatus(f"{what} failed: {exc}", error=True)
            return None
        finally:
            self.updateButtons()

    def onRerunAllButton(self) -> None:
        editor = self._currentEditor()
        if editor is None:
            self.setStatus("Run 'Segment volume' first.", error=True)
            return
        slices = self._tryInPanel("Re-run all", editor.rerun_all)
        if slices is not None:
            self.setStatus(f"Re-ran {len(slices)} slices from the current points.")

    def onUndoButton(self) -> None:
        self.setStatus("")
        what = self._tryInPanel("Undo", self.logic.undo)
        if what:
            self.setStatus(f"Undone: {what}.")
        elif not self.ui.statusLabel.text:
            self.setStatus("Nothing to undo.")

    def onPlacePoint(self, role: str) -> None:
        """Place one point of ``role`` ('foreground' or 'background') with the next click in a slice view."""
        editor = self._currentEditor()
        if editor is None:
            self.setStatus("Run 'Segment volume' first.", error=True)
            return
        state = editor.state
        pointList = self._tryInPanel("Adding a point", lambda: self.logic.promptPointList(
            state.segmentation_node, state.segment_id, role))
        if pointList is None:
            return
        appLogic = slicer.app.applicationLogic()
        start_placing(pointList, appLogic.GetSelectionNode(), appLogic.GetInteractionNode())
        self.setStatus(f"Click in a slice view to add a {role} point; its slice is re-segmented.")


#
# Logic
#
class FewShotSAMLogic(ScriptedLoadableModuleLogic, SegmentFromExampleLogic):
    """The module's logic: the console batch API is ``segmentFromExample`` (see FewShotSAMHelpers.logic).

    Example::

        logic = FewShotSAM.FewShotSAMLogic()
        outId = logic.segmentFromExample(volumeNode, segmentationNode, segmentId, device="auto")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentFromExampleLogic.__init__(self)
        # Downloaded weights go to Slicer's cache folder, never into the extension's folder.
        cache = getattr(getattr(slicer, "app", None), "cachePath", None)
        if cache:
            self.weights_folder = os.path.join(cache, "FewShotSAM")

    def getParameterNode(self):
        return FewShotSAMParameterNode(super().getParameterNode())

    def installDependencies(self, confirm: bool = True, **kwargs) -> bool:
        """Install the missing Python packages after one question (when ``confirm``), with a progress dialog;
        True when all are there, False when declined. A failure raises UserInputError (one sentence).

        PyTorch comes from the PyTorch extension (the build matching the GPU); the other packages of
        Resources/requirements.txt from Slicer's pip helpers, with every installed package pinned so that
        nothing Slicer ships is replaced.
        """
        dialog = None

        def ask(text: str) -> bool:
            return slicer.util.confirmOkCancelDisplay(text, "Install Python packages")

        def progress(text: str, done: int, total: int) -> None:
            nonlocal dialog
            if dialog is None:
                dialog = slicer.util.createProgressDialog(windowTitle="Segment from one example", maximum=total)
                dialog.setCancelButton(None)
            dialog.labelText = f"{text}..." if done < total else text
            dialog.value = done
            slicer.app.processEvents()

        try:
            return SegmentFromExampleLogic.installDependencies(
                self, confirm=ask if confirm else None, progress=progress, **kwargs)
        finally:
            if dialog is not None:
                dialog.close()


#
# Test
#
class FewShotSAMTest(ScriptedLoadableModuleTest):
    """Self-test in real Slicer: a synthetic volume made here, a painted slice, a run, a point edit, undo.

    Missing Python packages are installed first (without asking: running the test is the consent); a
    failure to install them fails the test with the installer's sentence."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentFromOneExample()

    def test_SegmentFromOneExample(self):
        import numpy as np

        logic = FewShotSAMLogic()
        try:
            self.delayDisplay("Checking the Python packages")
            self.assertTrue(logic.installDependencies(confirm=False))
            self.delayDisplay("Creating a volume with an ellipsoid")
            z, y, x = np.mgrid[0:5, 0:64, 0:64].astype(float)
            truth = ((y - 30) / 14) ** 2 + ((x - 34) / 10) ** 2 + ((z - 2) / 3.0) ** 2 <= 1
            rng = np.random.default_rng(0)
            image = (100 + 20 * rng.standard_normal(truth.shape) + 500 * truth).astype(np.float32)
            volume = slicer.util.addVolumeFromArray(image, ijkToRAS=np.diag([0.9, 0.9, 3.0, 1.0]), name="Ellipsoid")
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            exampleId = segmentation.GetSegmentation().AddEmptySegment("", "ellipsoid")
            example = np.zeros(truth.shape, np.uint8)
            example[2] = truth[2]
            slicer.util.updateSegmentBinaryLabelmapFromArray(example, segmentation, exampleId, volume)

            self.delayDisplay("Segmenting from the painted middle slice")
            outId = logic.segmentFromExample(volume, segmentation, exampleId, device="cpu")
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outId, volume) > 0
            dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
            self.assertGreater(dice, 0.7)
            painted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, exampleId, volume)
            self.assertTrue(np.array_equal(painted, example))

            self.delayDisplay("Adding a background point re-segments only its slice")
            editor = logic.editor(segmentation, outId)
            self.assertIsNotNone(editor)
            before = mask.copy()
            backgroundList = logic.promptPointList(segmentation, outId, "background")
            self.assertIs(backgroundList, editor.state.bg_node)
            ras = index_to_ras(volume, [[1, 30, 34]])[0]
            backgroundList.AddControlPoint(list(ras), "")
            self.assertEqual(editor.last_rerun, [1])
            after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outId, volume) > 0
            self.assertTrue(np.array_equal(np.delete(after, 1, axis=0), np.delete(before, 1, axis=0)))

            self.delayDisplay("Undo")
            logic.undo()
            restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, outId, volume) > 0
            self.assertTrue(np.array_equal(restored, before))
        finally:  # the test's logic lets go of its editors, sessions and scene observers
            logic.release()
            logic.unwatch_scenes()
        self.delayDisplay(f"Test passed (Dice {dice:.3f})")
