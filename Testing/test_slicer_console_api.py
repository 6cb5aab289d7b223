"""The console batch API ``segmentFromExample`` end to end on real CHAOS MRI volumes, in real MRML
(headless ``slicer-core``): a loop over two volumes, the right kidney painted on its middle slice only.

Embeddings come from the shared persistent cache (``.cache/embeddings``, filled by
``python tools/lab.py precompute-embeddings``) so the test decodes but does not re-encode; without the cache
it still runs, only slower.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CHAOS_DIR

slicer = pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
DATA = CHAOS_DIR
sys.path.insert(0, str(REPO / "FewShotSAM"))

from FewShotSAMHelpers import geometry as G, labelmaps as LM, logic as LG  # noqa: E402
from FewShotSAMLib.errors import UserInputError  # noqa: E402

RIGHT_KIDNEY = 2
CASES = (1, 2)
# Measured with boxprop + LiteMedSAM (CPU): case 1 Dice 0.944, case 2 Dice 0.929 (see docs/SLICER.md).
DICE_FLOOR = 0.85


def load_case(scene, case: int):
    """A CHAOS image as a volume node (the library's reading of its geometry) and its label array."""
    from FewShotSAMLib.volume import read_volume

    image = read_volume(DATA / f"image_{case}.nii.gz")
    label = read_volume(DATA / f"label_{case}.nii.gz", "label")
    node = G.add_volume_node(scene, image.array, G.ijk_to_ras_from_index_to_lps(image.index_to_lps_matrix),
                             f"chaos_{case}")
    return node, label.array


def paint_middle_slice(scene, volume_node, truth: np.ndarray):
    """A segmentation whose example segment is the organ on the middle of its axial slices."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    middle = int(slices[len(slices) // 2])
    example = np.zeros_like(truth)
    example[middle] = truth[middle]
    sid = seg.GetSegmentation().AddEmptySegment("", "right kidney", [0.8, 0.6, 0.2])
    LM.set_segment_mask(seg, sid, volume_node, example)
    return seg, sid, middle


@pytest.mark.skipif(not DATA.is_dir(), reason=f"CHAOS data not found at {DATA}")
def test_console_api_loop_over_chaos_volumes():
    LM.ensure_segmentation_converters()
    logic = LG.SegmentFromExampleLogic()
    logic.embedding_cache_dir = str(REPO / ".cache" / "embeddings")
    scores = {}
    for case in CASES:
        scene = slicer.vtkMRMLScene()
        volume, labels = load_case(scene, case)
        truth = labels == RIGHT_KIDNEY
        seg, example_id, middle = paint_middle_slice(scene, volume, truth)
        t0 = time.perf_counter()
        out_id = logic.segmentFromExample(volume, seg, example_id, generator="boxprop", sam="litemedsam",
                                          device="cpu", extent="auto", showPrompts=False)
        seconds = time.perf_counter() - t0
        mask = LM.segment_mask(seg, out_id, volume)
        d = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        scores[case] = d
        print(f"\nCHAOS case {case}: right kidney painted on slice {middle}; Dice {d:.3f}; "
              f"{len(logic.last_result.segmented_slices)} slices; {seconds:.1f} s "
              f"({logic.sessions[next(reversed(logic.sessions))].cache.encoded} slices encoded)")
        # The example is untouched, no prompt lists were made, the output has the volume's geometry.
        example_now = LM.segment_mask(seg, example_id, volume)
        expected = np.zeros_like(truth)
        expected[middle] = truth[middle]
        np.testing.assert_array_equal(example_now, expected)
        assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0
        assert seg.GetSegmentation().GetSegment(out_id).GetName() == "right kidney (from example)"
        assert d > DICE_FLOOR, f"case {case}: Dice {d:.3f}"
    assert len(scores) == len(CASES)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"CHAOS data not found at {DATA}")
def test_console_api_raises_clear_errors_before_touching_anything():
    LM.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume, labels = load_case(scene, CASES[0])
    seg, example_id, _ = paint_middle_slice(scene, volume, labels == RIGHT_KIDNEY)
    logic = LG.SegmentFromExampleLogic()
    n = scene.GetNumberOfNodes()
    with pytest.raises(UserInputError, match="Unknown prompt generator"):
        logic.segmentFromExample(volume, seg, example_id, generator="nonsense")
    with pytest.raises(UserInputError, match="not 'auto' nor a slice range"):
        logic.segmentFromExample(volume, seg, example_id, extent="middle")
    with pytest.raises(UserInputError, match="Unknown device"):
        logic.segmentFromExample(volume, seg, example_id, generator="boxprop", device="tpu")
    assert scene.GetNumberOfNodes() == n
    assert list(seg.GetSegmentation().GetSegmentIDs()) == [example_id]
