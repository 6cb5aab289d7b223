"""Fill the persistent embedding cache (.cache/embeddings) for all CHAOS volumes (axial, LiteMedSAM in the
library's default precision for this machine, into that precision's folder; FEWSHOTSAM_PRECISION=fp32 for the
float32 folder the committed tables were computed from)."""
import logging, sys, time
from pathlib import Path
import torch
from FewShotSAMLib.sam import load_backend
from FewShotSAMLib.sam.cache import EmbeddingCache
from FewShotSAMLib.slices import PreparedVolume
from FewShotSAMLib.volume import read_volume, choose_intensity

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/chaos_t2")
backend = load_backend("litemedsam", "cpu")
cache = EmbeddingCache(backend, cap_bytes=1 << 28, persist_dir=".cache/embeddings")
for img in sorted(data.glob("image_*.nii.gz"), key=lambda p: int(p.name.split("_")[1].split(".")[0])):
    t = time.time()
    vol = read_volume(img)
    pv = PreparedVolume(vol.array, vol.spacing, 0, choose_intensity(vol.array, vol.metadata), backend.input_size)
    pv.encode(cache, range(pv.n_slices))
    print(img.name, pv.n_slices, f"{time.time()-t:.1f}s", flush=True)
