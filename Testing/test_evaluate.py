"""Tests of the evaluation harness: folds, supports, chunks, Dice, aggregation, JSON/Markdown/PNG output,
and one small real-data run (skipped without the CHAOS data)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from FewShotSAMLib.errors import UserInputError

from conftest import CHAOS_DIR, require
from fewshotsam_lab import datasets as D
from fewshotsam_lab import evaluate as E

IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]


def test_folds_follow_the_standard_split():
    assert D.fold_volume_ids(IDS, 0) == [1, 2, 3, 5, 8]
    assert D.fold_volume_ids(IDS, 1) == [8, 10, 13, 15, 19]
    assert D.fold_volume_ids(list(reversed(IDS)), 4) == [36, 37, 38, 39, 1]  # sorted first, wraps to 0
    for f in range(5):
        assert len(D.fold_volume_ids(IDS, f)) == 5
    assert D.parse_folds("0-4") == [0, 1, 2, 3, 4] and D.parse_folds("3,1") == [1, 3]
    with pytest.raises(UserInputError):
        D.parse_folds("7")
    with pytest.raises(UserInputError):
        D.parse_folds("a-b")
    with pytest.raises(UserInputError):
        D.fold_volume_ids(IDS[:10], 3)


def test_case_listing_pairs_images_with_labels(tmp_path):
    for name in ("image_3.nii.gz", "label_3.nii.gz", "image_10.nii.gz", "label_10.nii.gz", "image_2.nii.gz",
                 "image_x.nii.gz", "label_7.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert [(c[0], c[1].name, c[2].name) for c in D.list_cases(tmp_path)] == [
        (3, "image_3.nii.gz", "label_3.nii.gz"), (10, "image_10.nii.gz", "label_10.nii.gz")]  # numeric order
    assert [(c[0], c[2] and c[2].name) for c in D.list_cases(tmp_path, labels=False)] == [
        (2, None), (3, "label_3.nii.gz"), (10, "label_10.nii.gz")]
    with pytest.raises(UserInputError, match="does not exist"):
        D.list_cases(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="holds no"):
        D.list_cases(empty, labels=False)


def test_support_slices_and_chunks():
    assert E.support_slice_indices(list(range(10, 22))) == [12, 16, 20]  # n=12: positions 2, 6, 10
    assert E.support_slice_indices([7]) == [7, 7, 7]
    chunks = E.query_chunks(list(range(5, 15)))
    assert [len(c) for c in chunks] == [4, 3, 3]
    assert sum(chunks, []) == list(range(5, 15))
    label = np.zeros((6, 4, 4), np.uint8)
    label[2:5, 1, 1] = 3
    np.testing.assert_array_equal(D.organ_slices(label, 3), [2, 3, 4])


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert E.dice(a, b) == 100.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert E.dice(a, b) == pytest.approx(50.0)
    assert E.dice(a, ~a) == 0.0


def records():
    out = []
    for fold in (0, 1):
        for organ in D.ORGANS.values():
            for vol, d in ((1, 60.0 + fold * 10), (2, 80.0 + fold * 10)):
                out.append({"fold": fold, "volume": vol, "organ": organ, "dice": d, "slices": 3})
    return out


def test_summarise_and_reports(tmp_path):
    m = E.summarise(records(), 0.25, list(D.ORGANS.values()))
    assert m["folds"][0]["mean"] == pytest.approx(70.0) and m["folds"][1]["mean"] == pytest.approx(80.0)
    assert m["mean"] == pytest.approx(75.0) and m["std_over_folds"] == pytest.approx(5.0)
    assert set(m["per_organ"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert m["per_organ"]["liver"] == pytest.approx(75.0)
    result = {"protocol": "fewshot", "setting": 1, "sam": "litemedsam", "folds": {"0": IDS[:5], "1": IDS[4:9]},
              "organs": list(D.ORGANS.values()), "methods": {"coarse": m}, "skipped": {"fob": "no weights"}}
    table = E.markdown_table(result)
    assert "| coarse | 75.00 ± 5.00 |" in table and "**75.00 ± 5.00**" in table and "Skipped `fob`" in table
    report = tmp_path / "R.md"
    report.write_text("# Results\n\nhand-written text\n")
    E.write_report_section(report, result)
    result["methods"]["coarse"]["mean"] = 12.5
    E.write_report_section(report, result)  # replaces, never duplicates
    text = report.read_text()
    assert text.count("<!-- evaluate:fewshot:setting1 -->") == 1 and "**12.50" in text and "hand-written" in text
    png = tmp_path / "r.png"
    E.plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_combined_targets_and_organ_parsing():
    assert D.parse_organs("1,2,3,4") == [1, 2, 3, 4]
    assert D.parse_organs("2+3,1") == [23, 1] and D.parse_organs("3+2") == [23]
    for bad in ("7", "1+4", "", "liver"):
        with pytest.raises(UserInputError):
            D.parse_organs(bad)
    label = np.zeros((5, 4, 4), np.uint8)
    label[1, 0, 0] = 2
    label[3, 2, 2] = 3
    label[2, 1, 1] = 1
    np.testing.assert_array_equal(D.organ_slices(label, 23), [1, 3])
    assert D.target_mask(label, 23).sum() == 2 and D.TARGET_NAMES[23] == "both_kidneys"
    assert D.organ_name(23) == "both_kidneys" and D.organ_name(31) == "label_31"


def test_merge_adds_a_later_method(tmp_path):
    """--merge keeps the methods of an earlier run of the same protocol, setting, backend and folds."""
    m = E.summarise(records(), 0.25, list(D.ORGANS.values()))
    earlier = {"protocol": "fewshot", "setting": 1, "sam": "litemedsam", "organs": list(D.ORGANS.values()),
               "folds": {"0": IDS[:5], "1": IDS[4:9]}, "methods": {"coarse": m}, "skipped": {"fob": "no weights"},
               "complete": True, "wall_seconds": 10.0}
    path = tmp_path / "r.json"
    path.write_text(E.json.dumps(earlier))
    old = E.load_for_merge(path, "fewshot", 1, "litemedsam", "0,1")
    merged = E.merge_results(old, dict(earlier, methods={"fob": m}, skipped={}, wall_seconds=5.0))
    assert list(merged["methods"]) == ["coarse", "fob"] and merged["skipped"] == {}
    assert [r["wall_seconds"] for r in merged["runs"]] == [10.0, 5.0]
    for other in (("product", 1, "litemedsam", "0,1"), ("fewshot", 2, "litemedsam", "0,1"),
                  ("fewshot", 1, "litemedsam", "0-4")):
        with pytest.raises(UserInputError):
            E.load_for_merge(path, *other)
    assert E.load_for_merge(tmp_path / "absent.json", "fewshot", 1, "litemedsam", "0,1") is None


def test_fob_is_skipped_without_weights(tmp_path):
    assert E.make_method("fob", 0, 1, str(tmp_path / "fold{fold}" / "s{setting}.pt")) is None
    assert E.fob_weights_path(E.FOB_WEIGHTS_PATTERN, 3, 2).as_posix() == ".cache/fob/setting2/fold3/fob.pt"


def test_cli_rejects_bad_input(tmp_path):
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path / "nope"), "--json", str(tmp_path / "o.json")])
    with pytest.raises(UserInputError):
        E.run(args)
    args = parser.parse_args(["--data", str(tmp_path), "--json", str(tmp_path / "o.json"), "--methods", "magic"])
    with pytest.raises(UserInputError):
        E.run(args)


def test_real_fewshot_small_is_deterministic(litemedsam, tmp_path):
    """Volumes 1, 2, 3 as one fold (support = volume 3), right kidney, coarse prompts, twice."""
    require(CHAOS_DIR)
    from FewShotSAMLib.sam.cache import EmbeddingCache

    cache = EmbeddingCache(litemedsam, cap_bytes=64 << 20, persist_dir=E.Path(__file__).resolve().parents[1] / ".cache" / "embeddings")
    store = E.CaseStore(D.list_cases(CHAOS_DIR), litemedsam, cache)
    runs = [E.evaluate(store, "fewshot", ["coarse"], {0: [1, 2, 3]}, 1, organs=[2]) for _ in range(2)]
    res = runs[0]
    m = res["methods"]["coarse"]
    assert res["protocol"] == "fewshot" and res["sam"] == "litemedsam"
    assert [v["volume"] for v in m["volumes"]] == [1, 2] and all(v["support"] == 3 for v in m["volumes"])
    assert all(0.0 <= v["dice"] <= 100.0 for v in m["volumes"]) and m["s_per_slice"] > 0
    assert [v["slices"] for v in m["volumes"]] == [14, 14]
    assert m["mean"] == pytest.approx(np.mean([v["dice"] for v in m["volumes"]]))
    assert runs[1]["methods"]["coarse"]["volumes"] == m["volumes"]
    json.dumps(res)  # JSON-ready


def test_real_product_one_volume(litemedsam):
    """Product protocol on volume 1, right kidney, boxprop: painted slice kept, counts consistent."""
    require(CHAOS_DIR)
    from FewShotSAMLib.sam.cache import EmbeddingCache

    cache = EmbeddingCache(litemedsam, cap_bytes=64 << 20, persist_dir=E.Path(__file__).resolve().parents[1] / ".cache" / "embeddings")
    store = E.CaseStore(D.list_cases(CHAOS_DIR), litemedsam, cache)
    r = E.product_volume(store, E.make_method("boxprop", 0, 1), store.get(1), 2)
    assert 0 <= r["dice_without_painted"] <= r["dice"] <= 100  # a perfect painted slice can only raise Dice
    assert r["missed"] < 14 and r["outside"] >= 0 and r["slices"] >= 14 - r["missed"]
    assert r["dice"] > 30  # box propagation on the same volume follows a kidney for several slices


# ---- the click benchmark (protocol clicks) ---------------------------------------------------------
def test_clicks_protocol_on_one_labelled_ct(tmp_path):
    """``python tools/lab.py evaluate --protocol clicks --image --label``: one round of corrective clicks on a
    TotalSegmentator vertebra through the lab's command line; JSON, Markdown section and chart written."""
    from conftest import CT_DIR, SHARED_EMBEDDINGS
    from fewshotsam_lab.cli import main

    ct, seg = D.totalseg_ct(CT_DIR)
    require(ct)
    out, report, chart = tmp_path / "c.json", tmp_path / "R.md", tmp_path / "c.png"
    report.write_text("# Results\n")
    rc = main(["evaluate", "--protocol", "clicks", "--image", str(ct), "--label", str(seg), "--organs", "31",
               "--methods", "boxprop", "--rounds", "1", "--sam", "litemedsam", "--cache-dir", str(SHARED_EMBEDDINGS),
               "--json", str(out), "--report", str(report), "--plot", str(chart)])
    assert rc == 0
    res = json.loads(out.read_text())
    m = res["methods"]["boxprop"]
    assert res["protocol"] == "clicks" and res["organs"] == ["label_31"] and len(m["dice_per_round"]) == 2
    vol = m["volumes"][0]
    assert vol["clicks"] >= 1 and vol["slices"] >= 10  # every erring slice but the painted one got a click
    assert 0 <= m["noc85"] <= 1 and 0 <= m["fail90"] <= 100
    assert "<!-- evaluate:clicks:litemedsam:example_ct_sm.nii.gz -->" in report.read_text()
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_product_protocol_on_one_labelled_ct(tmp_path):
    """``evaluate --protocol product --image --label``: a TotalSegmentator vertebra, with ``--hole-points``
    recorded; the Markdown section is the image's own (it never replaces the CHAOS table)."""
    from conftest import CT_DIR, SHARED_EMBEDDINGS
    from fewshotsam_lab.cli import main

    ct, seg = D.totalseg_ct(CT_DIR)
    require(ct)
    out, report = tmp_path / "p.json", tmp_path / "R.md"
    report.write_text("# Results\n<!-- evaluate:product:setting1 -->\nCHAOS\n<!-- /evaluate:product:setting1 -->\n")
    rc = main(["evaluate", "--protocol", "product", "--image", str(ct), "--label", str(seg), "--organs", "1,31",
               "--methods", "boxprop", "--hole-points", "--sam", "litemedsam", "--cache-dir", str(SHARED_EMBEDDINGS),
               "--json", str(out), "--report", str(report)])
    assert rc == 0
    res = json.loads(out.read_text())
    v = res["methods"]["boxprop"]["volumes"]
    # named by label number: label 1 of this CT is not CHAOS's liver
    assert res["organs"] == ["label_1", "label_31"] and res["hole_points"] is True and res["image"] == ct.name
    assert len(v) == 2 and all(30 < r["dice"] <= 100 for r in v)
    text = report.read_text()
    assert "CHAOS" in text and f"<!-- evaluate:product:{ct.name} -->" in text


def test_clicks_protocol_input_errors(tmp_path):
    with pytest.raises(UserInputError, match="go together"):
        E.run(E_args(protocol="fewshot", image="a.nii.gz", label="b.nii.gz", json=str(tmp_path / "x.json")))
    with pytest.raises(UserInputError, match="does not exist"):
        E.run(E_args(protocol="product", image=str(tmp_path / "a.nii.gz"), label=str(tmp_path / "b.nii.gz"),
                     json=str(tmp_path / "x.json")))
    with pytest.raises(UserInputError, match="Pass --data"):
        E.run(E_args(protocol="clicks", json=str(tmp_path / "x.json")))
    with pytest.raises(UserInputError, match="does not exist"):
        E.run(E_args(protocol="clicks", image=str(tmp_path / "a.nii.gz"), label=str(tmp_path / "b.nii.gz"),
                     organs="31", json=str(tmp_path / "x.json")))
    assert not (tmp_path / "x.json").exists()


def E_args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    args = parser.parse_args(["--json", kw.pop("json")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args
