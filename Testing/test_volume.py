"""Geometry and intensity handling: label matching, axis choice, IJK<->LPS, the slice<->model frame."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CT_DIR, require
from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.volume import (SliceFrame, Volume, atomic_write, choose_axis, choose_intensity, label_on_image_grid,
                                  normalise, read_volume, select_example, to_sitk, write_label)

OBLIQUE = np.array([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [-0.8, 0.6, 0.0]])  # columns: i, j, k directions


def make_volume(shape=(7, 9, 11), spacing=(3.0, 0.7, 1.1), origin=(10.0, -20.0, 5.0), direction=OBLIQUE) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.integers(0, 5, size=shape).astype(np.uint8), np.array(spacing), np.array(origin),
                  np.array(direction))


def test_index_lps_round_trip_matches_simpleitk():
    vol = make_volume()
    img = to_sitk(vol)
    idx = np.array([[0, 0, 0], [6, 8, 10], [2.5, 3.25, 7.0]])
    lps = vol.index_to_lps(idx)
    for i, p in zip(idx, lps):
        expected = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in i[::-1]])
        assert np.allclose(p, expected, atol=1e-9)
    assert np.allclose(vol.lps_to_index(lps), idx, atol=1e-9)


def _relabelled(vol: Volume, perm, flips) -> Volume:
    """The same voxels written with axes permuted (perm: new axis a holds old axis perm[a]) and flipped."""
    arr = np.transpose(vol.array, perm)
    m = vol.index_to_lps_matrix
    cols = m[:3, :3][:, list(perm)].copy()
    origin = m[:3, 3].copy()
    for a in flips:
        arr = np.flip(arr, a)
        origin = origin + cols[:, a] * (arr.shape[a] - 1)
        cols[:, a] = -cols[:, a]
    spacing = np.linalg.norm(cols, axis=0)
    direction_np = cols / spacing  # numpy order columns
    return Volume(np.ascontiguousarray(arr), spacing, origin, direction_np[:, ::-1])


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (1,)), ((2, 0, 1), ()), ((1, 2, 0), (0, 2))])
def test_label_with_other_axis_order_or_flips_is_accepted(perm, flips):
    image = make_volume()
    label = _relabelled(image, perm, flips)
    assert not image.same_geometry(label)
    assert np.array_equal(label_on_image_grid(image, label), image.array)


def test_label_on_other_voxels_is_rejected():
    image = make_volume()
    shifted = Volume(image.array, image.spacing, image.origin + 0.4, image.direction)
    with pytest.raises(UserInputError, match="same voxels"):
        label_on_image_grid(image, shifted)
    smaller = Volume(image.array[:, :, :-1], image.spacing, image.origin, image.direction)
    with pytest.raises(UserInputError, match="same voxels"):
        label_on_image_grid(image, smaller)


def test_dicom_series_and_flipped_label_map_agree_physically():
    ct = require(CT_DIR)
    image = read_volume(ct / "example_ct_dicom")
    label_vol = read_volume(ct / "example_seg_dicom.nii.gz")
    assert image.metadata.get("modality") == "CT"
    labels = label_on_image_grid(image, label_vol)
    # every labelled voxel of the resampled map is the same physical voxel in the label file
    for idx in np.argwhere(labels == 5)[::5000]:
        li = np.round(label_vol.lps_to_index(image.index_to_lps(idx))).astype(int)[0]
        assert label_vol.array[tuple(li)] == 5


def test_select_example_errors():
    arr = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(UserInputError, match="empty"):
        select_example(arr, None)
    arr[1, 1, 1], arr[1, 2, 2] = 2, 3
    with pytest.raises(UserInputError, match="several labels"):
        select_example(arr, None)
    with pytest.raises(UserInputError, match="Label 7 is not"):
        select_example(arr, 7)
    assert select_example(arr, 3).sum() == 1


def test_choose_axis_is_the_painted_one():
    m = np.zeros((20, 30, 40), bool)
    m[:, 15, 5:30] = True  # painted on one slice of axis 1
    assert choose_axis(m, (1, 1, 1)) == 1
    m2 = np.zeros((20, 30, 40), bool)
    m2[[4, 12], 5:20, 5:30] = True  # two slices of axis 0
    assert choose_axis(m2, (5, 1, 1)) == 0


def test_intensity_ct_window_and_mri_percentiles():
    rng = np.random.default_rng(1)
    ct = rng.normal(40, 200, (10, 50, 50)).round().astype(np.int16)
    ct[:, :5] = -1024
    it = choose_intensity(ct)
    assert it.kind == "ct-window" and (it.low, it.high) == (-160, 240)
    assert choose_intensity(ct, window=(400, 1800)).low == -500
    padded = ct.copy()
    padded[:, :, :8] = -2048  # padding outside the scanner's field of view
    assert choose_intensity(padded).kind == "ct-window"
    assert choose_intensity(padded.astype(np.float32) + 0.5).kind == "percentile"  # not integral: not HU
    with pytest.raises(UserInputError, match="width"):
        choose_intensity(ct, window=(40, 0))
    mr = rng.gamma(2.0, 100.0, (10, 50, 50))
    it = choose_intensity(mr)
    assert it.kind == "percentile"
    n = normalise(mr, it)
    assert n.dtype == np.float32 and n.min() == 0 and n.max() == 1
    assert 0.004 < (n == 1).mean() < 0.006  # the top 0.5 % clipped


@pytest.mark.parametrize("rows,cols,sr,sc", [(256, 256, 1.25, 1.25), (512, 512, 0.8, 0.8), (40, 256, 7.7, 1.25),
                                             (100, 60, 1.0, 2.0)])
def test_slice_frame_round_trip_without_shift(rows, cols, sr, sc):
    f = SliceFrame(rows, cols, sr, sc, 256)
    pts = np.array([[0, 0], [rows - 1, cols - 1], [rows / 3, cols / 2]])
    assert np.allclose(f.points_to_native(f.points_to_model(pts)), pts, atol=1e-4)
    # physical aspect is kept and the longest side fills the frame
    fr, fc = f.scale
    assert np.isclose(fr / fc, sr / sc)
    assert max(f.valid_shape) == 256
    # a rectangle's centroid does not move through model frame and back
    m = np.zeros((rows, cols), bool)
    m[rows // 4: rows // 2, cols // 3: 2 * cols // 3] = True
    logits = np.where(f.mask_to_model(m), 5.0, -5.0)
    back = f.to_native(logits) > 0
    c0 = np.argwhere(m).mean(0)
    c1 = np.argwhere(back).mean(0)
    assert np.allclose(c0, c1, atol=0.6)
    assert abs(int(back.sum()) - int(m.sum())) <= 0.1 * m.sum()


def test_write_label_keeps_geometry_and_is_atomic(tmp_path):
    vol = make_volume()
    out = tmp_path / "seg.nii.gz"
    write_label(vol, vol.array > 2, out)
    back = sitk.ReadImage(str(out))
    assert np.allclose(back.GetDirection(), vol.direction.reshape(-1), atol=1e-6)
    assert np.allclose(back.GetOrigin(), vol.origin, atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back), (vol.array > 2).astype(np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600
    out.write_bytes(b"previous")

    def failing(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(out, failing)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
