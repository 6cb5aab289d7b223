"""``python tools/lab.py calibrate-fob-extent``: the threshold with which FoB decides where a propagated
target ends (``FoBGenerator.propagation_presence``), chosen on the product protocol.

For each threshold of a grid the product protocol (the middle slice painted, automatic extent) runs on
every volume and organ with FoB in propagation mode on the chosen backend; box propagation runs once
beside it. The threshold is a choice made with reference labels, so the figure reported for it is
cross-validated: for each of the five folds the threshold that scores best on the volumes outside the
fold is measured on the fold's volumes. The threshold written into the weights' metadata
(``propagation.min_corr``, with ``--write``) is the best on all the volumes, as a shipped model is
trained on all its data; the cross-validated figure is the one to report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.sam.names import DEFAULT_SAM
from FewShotSAMLib.threads import single_threaded_blas
from FewShotSAMLib.volume import atomic_write_text, check_output_path

from .datasets import TARGET_NAMES, fold_volume_ids, list_cases, parse_organs
from .evaluate import product_volume

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``calibrate-fob-extent``."""
    parser.add_argument("--data", required=True, help="folder with image_<id>.nii.gz and label_<id>.nii.gz (CHAOS T2)")
    parser.add_argument("--weights", default=None, help="FoB weights (default: the shipped ones for --sam)")
    parser.add_argument("--grid", default=",".join(str(t) for t in DEFAULT_GRID),
                        help="comma-separated thresholds of the mean correlation to try")
    parser.add_argument("--organs", default="1,2,3,4", help="labels to evaluate")
    parser.add_argument("--sam", default=DEFAULT_SAM, help="SAM backend")
    parser.add_argument("--cache-dir", default=".cache/embeddings", help="persistent embedding cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", required=True, help="output JSON with every per-volume record")
    parser.add_argument("--write", action="store_true",
                        help="write the threshold chosen on all volumes into the weights' metadata file")


def _grid(text: str) -> list[float]:
    try:
        grid = sorted({float(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise UserInputError(f"--grid '{text}' is not a list of numbers; write e.g. 0.03,0.05,0.07.") from None
    if not grid or any(not 0.0 <= t <= 1.0 for t in grid):
        raise UserInputError(f"--grid '{text}' must hold thresholds between 0 and 1.")
    return grid


def _mean_dice(records: Sequence[dict], volumes: set[int]) -> float:
    return float(np.mean([r["dice"] for r in records if r["volume"] in volumes]))


def cross_validate(runs: dict[str, list[dict]], ids: Sequence[int]) -> dict:
    """Per fold, the threshold (a key of ``runs`` other than 'boxprop') best on the volumes outside the
    fold, measured on the fold's volumes; and the threshold best on all volumes. Means over folds."""
    thresholds = [k for k in runs if k != "boxprop"]
    folds = []
    for fold in range(5):
        test = set(fold_volume_ids(ids, fold))
        train = set(ids) - test
        best = max(thresholds, key=lambda k: _mean_dice(runs[k], train))
        recs = [r for r in runs[best] if r["volume"] in test]
        base = [r for r in runs["boxprop"] if r["volume"] in test]
        folds.append({"fold": fold, "threshold": float(best), "dice": _mean_dice(recs, test),
                      "boxprop_dice": _mean_dice(base, test),
                      "outside_per_target": float(np.mean([r["outside"] for r in recs])),
                      "missed_per_target": float(np.mean([r["missed"] for r in recs])),
                      "boxprop_outside_per_target": float(np.mean([r["outside"] for r in base])),
                      "boxprop_missed_per_target": float(np.mean([r["missed"] for r in base]))})
    everything = set(ids)
    overall = max(thresholds, key=lambda k: _mean_dice(runs[k], everything))
    mean = lambda key: float(np.mean([f[key] for f in folds]))  # noqa: E731
    return {"folds": folds, "cv_dice": mean("dice"), "boxprop_dice": mean("boxprop_dice"),
            "cv_outside_per_target": mean("outside_per_target"), "cv_missed_per_target": mean("missed_per_target"),
            "boxprop_outside_per_target": mean("boxprop_outside_per_target"),
            "boxprop_missed_per_target": mean("boxprop_missed_per_target"),
            "min_corr": float(overall), "dice_all_volumes_at_min_corr": _mean_dice(runs[overall], everything),
            "dice_by_threshold": {k: _mean_dice(runs[k], everything) for k in thresholds}}


@single_threaded_blas()
def _run_all(store, generators: dict, organs: Sequence[int]) -> dict[str, list[dict]]:
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {}
    total = len(generators) * len(store.ids) * len(organs)
    with tqdm(total=total, desc="product protocol", unit="target", file=sys.stderr) as bar:
        for key, gen in generators.items():
            runs[key] = []
            for vid in store.ids:
                case = store.get(vid)
                for organ in organs:
                    r = product_volume(store, gen, case, organ)
                    runs[key].append({"volume": vid, "organ": TARGET_NAMES[organ], "dice": r["dice"],
                                      "outside": r["outside"], "missed": r["missed"]})
                    bar.update()
    return runs


def run(args: argparse.Namespace) -> int:
    """Run the calibration described by ``args``; returns the exit code."""
    import torch

    from FewShotSAMLib.prompts.boxprop import BoxPropagation
    from FewShotSAMLib.fob import shipped_weights
    from FewShotSAMLib.prompts.fob import FoBGenerator

    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache

    from .evaluate import CaseStore

    torch.set_num_threads(max(1, int(args.threads)))
    grid = _grid(args.grid)
    organs = parse_organs(args.organs)
    check_output_path(args.json, "JSON output")
    weights = Path(args.weights) if args.weights else shipped_weights(args.sam)
    cases = list_cases(args.data)
    ids = [c[0] for c in cases]
    fold_volume_ids(ids, 4)  # needs the 20 volumes of the five folds: a clear error otherwise
    backend = load_backend(args.sam, "cpu")
    store = CaseStore(cases, backend, EmbeddingCache(backend, cap_bytes=256 << 20, persist_dir=args.cache_dir))
    generators = {"boxprop": BoxPropagation()}
    generators.update({f"{t:g}": FoBGenerator(weights=weights, mode="propagate", min_corr=t) for t in grid})
    t0 = time.perf_counter()
    runs = _run_all(store, generators, organs)
    cv = cross_validate(runs, ids)
    result = {"weights": str(weights), "sam": backend.name, "organs": [TARGET_NAMES[o] for o in organs],
              "grid": grid, **cv, "wall_seconds": round(time.perf_counter() - t0, 1), "records": runs}
    atomic_write_text(args.json, json.dumps(result, indent=1))
    log.info("cross-validated: FoB %.2f (thresholds %s), box propagation %.2f; outside/missed per target %.2f/%.2f "
             "(box propagation %.2f/%.2f); best on all volumes: %g (%.2f)", cv["cv_dice"],
             ", ".join(f"{f['threshold']:g}" for f in cv["folds"]), cv["boxprop_dice"], cv["cv_outside_per_target"],
             cv["cv_missed_per_target"], cv["boxprop_outside_per_target"], cv["boxprop_missed_per_target"],
             cv["min_corr"], cv["dice_all_volumes_at_min_corr"])
    if args.write:
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["propagation"] = {
            "min_corr": cv["min_corr"], "sam_backend": backend.name, "grid": grid,
            "cv_dice": round(cv["cv_dice"], 2), "boxprop_cv_dice": round(cv["boxprop_dice"], 2),
            "cv_thresholds": [f["threshold"] for f in cv["folds"]], "data": [str(c[1].name) for c in cases],
            "command": "python tools/lab.py calibrate-fob-extent " + " ".join(sys.argv[2:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        log.info("wrote propagation.min_corr = %g into %s", cv["min_corr"], meta_path)
    return 0

