"""The command line: every kind of bad input gives one sentence, exit code 2 and no output; the main job
writes a label map in the image's geometry, the prompts JSON (and re-runs from an edited one) and an
overlay; the TotalSegmentator DICOM series works as input with its flipped label map as the example."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CT_DIR, require
from FewShotSAMLib.cli import main
from FewShotSAMLib.volume import Volume, label_on_image_grid, read_volume, to_sitk, write_label
from test_engine import blob_volume, dice

DICOM_LIVER_FLOOR = 93.0  # measured 97.4 with the defaults: see docs/RESULTS.md, "Engine floors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    image, blob = blob_volume()
    direction = np.array([[1, 0, 0], [0, -1, 0], [0, 0, 1]], float)
    vol = Volume(image, (3.0, 1.0, 1.0), (5.0, 10.0, -20.0), direction)
    sitk.WriteImage(to_sitk(vol), str(d / "image.nii.gz"))
    ex = np.zeros(blob.shape, np.uint8)
    ex[4] = blob[4] * 3
    write_label(vol, ex, d / "example.nii.gz")
    two = ex.copy()
    two[4, 0, 0] = 5
    write_label(vol, two, d / "two_labels.nii.gz")
    write_label(vol, np.zeros_like(ex), d / "empty.nii.gz")
    other = Volume(ex, (3.0, 1.0, 1.0), (6.0, 10.0, -20.0), direction)
    write_label(other, ex, d / "shifted.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(image[4]), str(d / "slice2d.nii.gz"))
    volume_3d = sitk.GetImageFromArray(image)
    sitk.WriteImage(sitk.JoinSeries([volume_3d, volume_3d]), str(d / "four_d.nii.gz"))
    (d / "corrupt.pth").write_bytes(b"not a checkpoint")
    return d, blob


def run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


BAD = [
    (["segment", "{d}/missing.nii.gz", "--example", "{d}/example.nii.gz"], "does not exist"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/missing.nii.gz"], "does not exist"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/corrupt.pth"], "cannot be read"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/shifted.nii.gz"], "same voxels"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/empty.nii.gz"], "empty"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--label", "9"], "Label 9 is not"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/two_labels.nii.gz"], "several labels"),
    (["segment", "{d}/slice2d.nii.gz", "--example", "{d}/example.nii.gz"], "3D"),
    (["segment", "{d}/four_d.nii.gz", "--example", "{d}/example.nii.gz"], "3D"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--range", "2:40"], "outside the volume"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--range", "x"], "--range"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--sam-checkpoint", "{d}/corrupt.pth"],
     "cannot be read"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--device", "cuda"], "CUDA"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--generator", "nope"], "Unknown prompt generator"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--window", "40"], "--window"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--fob-mode", "box+bg"],
     "goes with --generator fob"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--generator", "fob", "--fob-mode", "ring"],
     "Unknown FoB prompt mode"),
    (["segment", "{d}/image.nii.gz", "--example", "{d}/example.nii.gz", "--previous", "{d}/example.nii.gz"],
     "pass --prompts-in too"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(files, capsys, argv, message):
    d, _ = files
    out = d / "out" / "seg.nii.gz"
    out.parent.mkdir(exist_ok=True)
    code, err = run(capsys, *[a.format(d=d) for a in argv], "--output", out, "--quiet")
    assert code == 2
    assert message in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_output_folder_must_exist(files, capsys):
    d, _ = files
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz",
                    "--output", d / "nowhere" / "seg.nii.gz")
    assert code == 2 and "does not exist" in err


def test_segment_writes_outputs_and_reruns_edited_prompts(files, capsys):
    d, blob = files
    seg, pj, png = d / "seg.nii.gz", d / "prompts.json", d / "overlay.png"
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output", seg,
                    "--prompts-out", pj, "--overlay-out", png)
    assert code == 0, err
    assert "segmented" in err and "ml" in err
    image = sitk.ReadImage(str(d / "image.nii.gz"))
    out = sitk.ReadImage(str(seg))
    assert out.GetSize() == image.GetSize()
    assert np.allclose(out.GetOrigin(), image.GetOrigin()) and np.allclose(out.GetDirection(), image.GetDirection())
    arr = sitk.GetArrayFromImage(out)
    assert set(np.unique(arr)) == {0, 3}  # the example's label value
    assert dice(arr > 0, blob) > 80
    data = json.loads(pj.read_text())
    assert data["painted_slices"] == [4] and data["slices"]
    first = data["slices"][0]
    vol = read_volume(d / "image.nii.gz")
    for corner in first["box"]:
        assert np.allclose(vol.index_to_lps(np.array(corner["ijk"])[::-1])[0], corner["lps"], atol=1e-2)
    assert sitk.ReadImage(str(png)).GetSize()[0] >= 256
    # unchanged prompts reproduce the result; an edited slice changes only that slice
    seg2 = d / "seg2.nii.gz"
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output", seg2,
                    "--prompts-in", pj, "--quiet")
    assert code == 0, err
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(seg2))), arr)
    k = first["slice"]
    first["box"] = None
    first["foreground"] = []
    first["background"] = [{"lps": c["lps"]} for c in data["slices"][0]["background"]] or [
        {"ijk": [32.0, 30.0, float(k)]}]
    edited = d / "edited.json"
    edited.write_text(json.dumps(data))
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output", seg2,
                    "--prompts-in", edited, "--quiet")
    assert code == 0, err
    arr2 = sitk.GetArrayFromImage(sitk.ReadImage(str(seg2)))
    others = [z for z in range(arr.shape[0]) if z != k]
    assert np.array_equal(arr2[others], arr[others])
    assert not np.array_equal(arr2[k], arr[k])
    # the same edit as a correction of the first result (--previous): background points only remove
    seg3 = d / "seg3.nii.gz"
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output", seg3,
                    "--prompts-in", edited, "--previous", seg, "--quiet")
    assert code == 0, err
    arr3 = sitk.GetArrayFromImage(sitk.ReadImage(str(seg3)))
    assert np.array_equal(arr3[others], arr[others]) and not (arr3[k] & ~arr[k]).any()


def test_fob_mode_prompts_every_slice_from_the_painted_slice(files, capsys):
    """``--generator fob --fob-mode box+bg``: FoB's ring box and background points on every slice (the default
    propagation gives the neighbour's box and no point), and the target is still found."""
    d, blob = files
    seg, pj = d / "seg_fob.nii.gz", d / "prompts_fob.json"
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output", seg,
                    "--prompts-out", pj, "--generator", "fob", "--fob-mode", "box+bg", "--range", "2:6", "--quiet")
    assert code == 0, err
    slices = json.loads(pj.read_text())["slices"]
    assert slices and all(s["background"] and s["box"] for s in slices)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg))) > 0
    assert dice(arr[2:7], blob[2:7]) > 70


def test_prompts_file_on_another_slice_is_rejected(files, capsys):
    d, _ = files
    pj = d / "bad_prompts.json"
    pj.write_text(json.dumps({"format": "fewshotsam-prompts", "axis_numpy": 0, "slices": [
        {"slice": 2, "foreground": [{"ijk": [30, 30, 5]}], "background": [], "box": None}]}))
    code, err = run(capsys, "segment", d / "image.nii.gz", "--example", d / "example.nii.gz", "--output",
                    d / "x.nii.gz", "--prompts-in", pj)
    assert code == 2 and "another slice" in err


def test_dicom_series_with_flipped_label_map(tmp_path, capsys):
    ct = require(CT_DIR)
    labels = read_volume(ct / "example_seg_dicom.nii.gz")
    liver = labels.array == 5
    zs = np.flatnonzero(liver.any((1, 2)))
    ex = np.zeros_like(labels.array)
    ex[zs[len(zs) // 2]] = liver[zs[len(zs) // 2]] * 5
    write_label(labels, ex, tmp_path / "example.nii.gz")
    seg = tmp_path / "seg.nii.gz"
    code, err = run(capsys, "segment", ct / "example_ct_dicom", "--example", tmp_path / "example.nii.gz",
                    "--output", seg, "--quiet")
    assert code == 0, err
    image = read_volume(ct / "example_ct_dicom")
    out = read_volume(seg)
    assert out.same_geometry(image)
    truth = label_on_image_grid(image, labels) == 5
    assert dice(out.array > 0, truth) > DICOM_LIVER_FLOOR



@pytest.mark.parametrize("command,lab", [("evaluate", "evaluate"), ("bench", "bench"), ("train", "train-fob"),
                                         ("demo", "demo")])
def test_research_subcommands_point_to_the_lab_in_one_sentence(capsys, command, lab):
    code, err = run(capsys, "-v", command, "--json", "x.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert f"python tools/lab.py {lab}" in lines[0]
