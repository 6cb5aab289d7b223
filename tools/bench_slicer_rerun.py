"""Re-run latency of one slice after a prompt-point edit, through the Slicer module's MRML code (headless
``slicer-core``): what a user waits for between releasing a point and seeing the slice updated.

Run by ``python -m FewShotSAMLib bench`` in a child process when slicer-core is installed (the library
itself never imports slicer); stand-alone: ``python tools/bench_slicer_rerun.py [DATA_DIR]``.
Prints one line ``BENCH_MRML {json}``. The first run on CHAOS volume 1 (right kidney painted on its middle
slice, boxprop) reads embeddings from ``.cache/embeddings`` when they are there.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "FewShotSAM")]


def main(data_dir: Path, repeats: int = 10) -> dict:
    import slicer

    from FewShotSAMHelpers import geometry as G, labelmaps as LM, logic as LG
    from FewShotSAMLib.volume import painted_slices, read_volume

    LM.ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    image = read_volume(data_dir / "chaos_t2" / "image_1.nii.gz")
    truth = read_volume(data_dir / "chaos_t2" / "label_1.nii.gz", "label").array == 2
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


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data"
    print("BENCH_MRML " + json.dumps(main(data)))
