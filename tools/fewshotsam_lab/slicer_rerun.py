"""Re-run latency of one slice after a prompt-point edit, through the Slicer module's MRML code (headless
``slicer-core``): what a user waits for between releasing a point and seeing the slice updated.

Run by ``python tools/lab.py bench`` in a child process when slicer-core is installed (the library
itself never imports slicer); stand-alone: ``python tools/lab.py bench-slicer-rerun [--data DATA_DIR]``.
Prints one line ``BENCH_MRML {json}``. The first run on CHAOS volume 1 (right kidney painted on its middle
slice, boxprop) reads embeddings from ``.cache/embeddings`` when they are there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets

REPO = datasets.REPO_ROOT


def measure(data_dir: Path, repeats: int = 10) -> dict:
    """The figures (median re-run, every edit's time, the first run's time and encoded slices)."""
    if str(REPO / "FewShotSAM") not in sys.path:  # the Slicer module's helper package
        sys.path.insert(0, str(REPO / "FewShotSAM"))
    import slicer

    from FewShotSAMHelpers import geometry as G, labelmaps as LM, logic as LG
    from FewShotSAMLib.volume import painted_slices, read_volume

    LM.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image_path, label_path = datasets.chaos_case(1, data_dir)
    image = read_volume(image_path)
    truth = read_volume(label_path, "label").array == 2
    vol = G.add_volume_node(scene, image.array, G.ijk_to_ras_from_index_to_lps(image.index_to_lps_matrix), "chaos_1")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    slices = painted_slices(truth, 0)
    middle = int(slices[len(slices) // 2])
    example = np.zeros_like(truth)
    example[middle] = truth[middle]
    ex = seg.GetSegmentation().AddEmptySegment("", "right kidney", [0.8, 0.6, 0.2])
    LM.set_segment_mask(seg, ex, vol, example)
    logic = LG.SegmentFromExampleLogic()
    logic.embedding_cache_dir = str(REPO / ".cache" / "embeddings")
    t0 = time.perf_counter()
    out = logic.segmentFromExample(vol, seg, ex, generator="boxprop", device="cpu")
    first_run_s = time.perf_counter() - t0
    editor = logic.editor(seg, out)
    state = editor.state
    times: list[float] = []
    logic.on_rerun = lambda done, seconds: times.append(seconds)
    targets = [k for k in sorted(state.boxes) if k != middle] or [middle]
    for i in range(repeats):
        k = targets[i % len(targets)]
        rows, cols = np.nonzero(truth[k]) if truth[k].any() else np.nonzero(example[middle])
        point = [k, int(rows.min()) - 3, int(cols.mean())]  # a background point just above the organ
        state.bg_node.AddControlPoint(list(G.index_to_ras(vol, [point])[0]), "bench")
    return {"rerun_mrml_ms": 1000 * statistics.median(times), "rerun_mrml_ms_all": [round(1000 * t, 1) for t in times],
            "rerun_mrml_volume_shape": list(image.array.shape), "rerun_mrml_first_run_s": round(first_run_s, 1),
            "rerun_mrml_slices_encoded": state.session.cache.encoded}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``bench-slicer-rerun`` command."""
    p.add_argument("--data", type=Path, default=datasets.data_root(),
                   help=f"The shared data folder (default {datasets.data_root()}, or ${datasets.DATA_ENV}).")
    p.add_argument("--repeats", type=int, default=10, help="Point edits to time (default 10).")


def run(args: argparse.Namespace) -> int:
    """Print ``BENCH_MRML {json}``."""
    print("BENCH_MRML " + json.dumps(measure(Path(args.data), args.repeats)))
    return 0
