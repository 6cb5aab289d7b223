"""``python tools/lab.py precompute-embeddings [DATA]``: fill the persistent embedding cache
(.cache/embeddings) for all CHAOS volumes (axial, LiteMedSAM in the library's default precision for this
machine, into that precision's folder; FEWSHOTSAM_PRECISION=fp32 for the float32 folder the committed
tables were computed from)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import datasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``precompute-embeddings`` command."""
    p.add_argument("data", nargs="?", type=Path, default=datasets.chaos_dir(),
                   help=f"CHAOS folder of image_<id>.nii.gz volumes (default {datasets.chaos_dir()}).")
    p.add_argument("--cache-dir", default=".cache/embeddings", help="persistent embedding cache")


def run(args: argparse.Namespace) -> int:
    """Encode every slice of every volume that the cache lacks; one line per volume."""
    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity, read_volume

    backend = load_backend("litemedsam", "cpu")
    cache = EmbeddingCache(backend, cap_bytes=1 << 28, persist_dir=args.cache_dir)
    for _, img, _ in datasets.list_cases(args.data, labels=False):
        t = time.time()
        vol = read_volume(img)
        pv = PreparedVolume(vol.array, vol.spacing, 0, choose_intensity(vol.array, vol.metadata), backend.input_size)
        pv.encode(cache, range(pv.n_slices))
        print(img.name, pv.n_slices, f"{time.time()-t:.1f}s", flush=True)
    return 0
