"""``python tools/lab.py bench``: encoder, generator and decoder speed, whole-volume cost, re-run latency,
start-up time and peak memory, as medians and as ratios to the plain float32 eager batch-1 encoder measured
in the same run (the machine may be shared: ratios from one run are what compare).

Encoder variants are timed in interleaved rounds (every variant once per round) so that a change of load
during the run affects all of them alike. The memory and start-up parts run in child processes
(``bench_child.py``) so that their peak memory and their imports are their own. The data (the default
CHAOS volume, the TotalSegmentator CT of the memory part, the Slicer re-run's volume) come from ``--data``
(default: ``datasets.data_root()``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.sam.names import DEFAULT_SAM
from FewShotSAMLib.slices import OUTSIDE_LOGIT
from FewShotSAMLib.volume import atomic_write_text, painted_slices, read_volume

from . import datasets

log = logging.getLogger(__name__)

TOOLS_DIR = Path(__file__).resolve().parents[1]  # fewshotsam_lab's folder (tools/)
LAB_SCRIPT = TOOLS_DIR / "lab.py"


def _organ_label(organ: int) -> str:
    """A CHAOS organ's name as the figures show it ('right kidney'), else the label number."""
    return datasets.ORGANS[organ].replace("_", " ") if organ in datasets.ORGANS else str(organ)


def _child_env() -> dict:
    """The environment of a child process: the library of this checkout and fewshotsam_lab importable."""
    path = os.pathsep.join([str(datasets.REPO_ROOT), str(TOOLS_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path)


@dataclass(frozen=True)
class EncoderVariant:
    """One way of running the encoder: arithmetic, BN folding, layout, compilation, batch size."""

    precision: str = "fp32"
    fuse: bool = False
    channels_last: bool = False
    compile: bool = False
    batch: int = 1
    threads: int = 0  # torch intra-op threads while this variant runs (0: leave as set)
    runtime: str = "torch"  # torch | onnxruntime (part "ort") | openvino (part "ov")

    @property
    def label(self) -> str:
        """Short name, e.g. 'bf16-fused-cl-b4' or 'fp32-b1-t1'."""
        return "-".join([self.precision] + (["fused"] if self.fuse else []) + (["cl"] if self.channels_last else [])
                        + (["compiled"] if self.compile else []) + _RUNTIME_PARTS.get(self.runtime, []) + [f"b{self.batch}"]
                        + ([f"t{self.threads}"] if self.threads else []))

    @staticmethod
    def parse(text: str) -> "EncoderVariant":
        """'bf16-fused-cl-b4' -> EncoderVariant (parts in any order)."""
        v = {"precision": "fp32", "fuse": False, "channels_last": False, "compile": False, "batch": 1, "threads": 0, "runtime": "torch"}
        for part in text.lower().split("-"):
            if part in ("fp32", "bf16", "fp16", "mixed"):
                v["precision"] = part
            elif part == "fused":
                v["fuse"] = True
            elif part == "cl":
                v["channels_last"] = True
            elif part == "compiled":
                v["compile"] = True
            elif part == "ort":
                v["runtime"] = "onnxruntime"
            elif part == "ov":
                v["runtime"] = "openvino"
            elif part.startswith("b") and part[1:].isdigit() and int(part[1:]) > 0:
                v["batch"] = int(part[1:])
            elif part.startswith("t") and part[1:].isdigit() and int(part[1:]) > 0:
                v["threads"] = int(part[1:])
            else:
                raise UserInputError(f"Unknown part '{part}' in encoder variant '{text}'; use e.g. fp32-b1 or "
                                     "bf16-fused-cl-compiled-b4-t2 (precision fp32/bf16/mixed, fused, cl, compiled, "
                                     "ort for ONNX Runtime, ov for OpenVINO, bN batch, tN threads).")
        return EncoderVariant(**v)


_RUNTIME_PARTS = {"onnxruntime": ["ort"], "openvino": ["ov"]}
PLAIN = EncoderVariant()
DEFAULT_VARIANTS = "fp32-fused-b4,fp32-fused-ort-b4,fp32-fused-ov-b4,bf16-fused-cl-b4,bf16-fused-ov-b4"


def library_default_variant() -> str:
    """The encoder variant the library itself runs on this CPU: OpenVINO in 'mixed' precision where the CPU
    has native bfloat16, else in float32; PyTorch with BN folding when openvino is not installed."""
    import torch

    from FewShotSAMLib.sam.device import openvino_available, resolve_precision

    if not openvino_available():
        return "fp32-fused-b4"
    return f"{resolve_precision('auto', torch.device('cpu'), mixed_is_fast=True)}-fused-ov-b4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``bench`` command."""
    p.add_argument("--data", type=Path, default=datasets.data_root(),
                   help=f"The shared data folder (chaos_t2/, totalseg_ct/; default {datasets.data_root()}, "
                   f"or ${datasets.DATA_ENV}).")
    p.add_argument("--volume", default=None, help="Volume to time (default: CHAOS image_1 from the shared data).")
    p.add_argument("--labels", default=None, help="Label map of --volume with the organs (default: CHAOS label_1).")
    p.add_argument("--organs", default="1,2,3,4", help="Label values of the organs to segment (default 1,2,3,4).")
    p.add_argument("--json", default=None, help="Write the figures to this JSON file.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu).")
    p.add_argument("--sam", default=DEFAULT_SAM, choices=("litemedsam", "litemedsam-points"),
                   help="The LiteMedSAM decoder of the whole-volume and re-run figures (same encoder).")
    p.add_argument("--fast", default=None, help="The encoder variant used for the whole-volume figures (default: the "
                   "library's default path on this machine: mixed-fused-ov-b4 on a CPU with native bfloat16, "
                   "fp32-fused-ov-b4 on others, fp32-fused-b4 without openvino).")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="Other encoder variants to time against the plain path, comma-separated ('' for none).")
    p.add_argument("--encoder-slices", type=int, default=8, help="Slices per encoder timing round (default 8).")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved encoder timing rounds (default 3).")
    p.add_argument("--volume-rounds", type=int, default=2, help="Alternating rounds of the encode pass and the "
                   "four-organ run, each from empty caches (default 2); ratios are medians of the per-round ratios.")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: PyTorch's choice).")
    p.add_argument("--skip", default="", help="Parts to skip, comma-separated: encoder, volume, rerun, startup, memory.")
    p.add_argument("--memory-slices", type=int, default=0, help="Slices of the large CT segmented in the memory part "
                   "(default 0: the automatic extent of the painted liver; N: N slices around it, forced).")
    p.add_argument("--memory-cap-mb", type=float, default=0,
                   help="Embedding-cache cap in the memory part (default 0: the library's default cap).")


# ---- helpers -------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _peak_rss_gb() -> float:
    """Peak resident memory of this process (GB), from /proc (Linux) or getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _make_backend(variant: EncoderVariant, device: str, sam: str = DEFAULT_SAM):
    from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend

    backend = LiteMedSAMBackend(device=device, precision=variant.precision, fuse=variant.fuse,
                                channels_last=variant.channels_last, compile=variant.compile,
                                runtime=variant.runtime, variant=sam)
    backend.batch_size = variant.batch
    return backend


def _chaos_default(data_dir: Path) -> tuple[Path, Path]:
    img, lab = datasets.chaos_case(1, data_dir)
    if not img.exists():
        raise UserInputError(f"No --volume given and the default CHAOS volume is missing at {img}; "
                             "pass --volume IMAGE --labels LABELS.")
    return img, lab


class _Timed:
    """Calls ``fn`` and adds its duration to ``self.seconds`` (used to time the generator and decoder
    inside a real whole-volume run)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


class _TimedGenerator:
    """A prompt generator whose ``generate`` calls are timed."""

    def __init__(self, generator) -> None:
        self.generator = generator
        self.name = getattr(generator, "name", "generator")
        self.generate = _Timed(generator.generate)


# ---- parts ---------------------------------------------------------------------------------------
def bench_encoder(frames: np.ndarray, variants: list[EncoderVariant], device: str, rounds: int) -> dict:
    """Median seconds per slice of each variant on ``frames`` (K, S, S), interleaved over ``rounds``, and
    each variant's largest embedding difference from the plain path (relative to the embeddings' range)."""
    import torch

    out: dict = {}
    backends = {}
    default_threads = torch.get_num_threads()
    for v in variants:
        torch.set_num_threads(v.threads or default_threads)
        t = time.perf_counter()
        backends[v] = _make_backend(v, device)
        # Warm-up (and compilation) on one batch.
        backends[v].encode(frames[:v.batch])
        out[v.label] = {"setup_s": round(time.perf_counter() - t, 2), "times": []}
        log.info("encoder %s ready in %.1f s", v.label, out[v.label]["setup_s"])
    reference = None
    for r in range(rounds):
        for v in variants:
            torch.set_num_threads(v.threads or default_threads)
            b = backends[v]
            embs = []
            t = time.perf_counter()
            for start in range(0, len(frames), v.batch):
                embs.append(b.encode(frames[start:start + v.batch]))
            dt = (time.perf_counter() - t) / len(frames)
            out[v.label]["times"].append(dt)
            if r == 0:
                emb = torch.cat(embs).cpu()
                if v == variants[0]:
                    reference = emb
                scale = float(reference.abs().max())
                out[v.label]["max_rel_diff"] = float((emb - reference).abs().max()) / scale
                out[v.label]["mean_cos"] = float(torch.nn.functional.cosine_similarity(
                    emb.flatten(1).double(), reference.flatten(1).double(), dim=1).mean())
            log.info("round %d %-28s %.3f s/slice", r + 1, v.label, dt)
    torch.set_num_threads(default_threads)
    plain = _median(out[variants[0].label]["times"])
    for v in variants:
        d = out[v.label]
        d["s_per_slice"] = _median(d["times"])
        d["speedup_vs_plain"] = plain / d["s_per_slice"]
        d["times"] = [round(t, 3) for t in d["times"]]
    return out


def bench_volume(image, labels: np.ndarray, organs: list[int], fast: EncoderVariant, device: str,
                 rounds: int = 2, sam: str = DEFAULT_SAM) -> tuple[dict, object]:
    """One encode pass over the volume, then the organs segmented in one session (each slice encoded once),
    with the generator and decoder timed inside the run; ``rounds`` times, alternating, each round from
    empty caches, so that the ratio of the two is taken from neighbouring measurements (this machine's
    speed drifts by tens of percent over minutes). Figures are medians over the rounds; the ratios are
    the medians of the per-round ratios. Returns the figures and the last round's session."""
    from FewShotSAMLib.engine import VolumeSession
    from FewShotSAMLib.prompts import DEFAULT_GENERATOR, make_generator
    from FewShotSAMLib.prompts.base import Prompts
    from FewShotSAMLib.sam.cache import EmbeddingCache
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity

    backend = _make_backend(fast, device, sam)
    # Warm-up: the encoder, and the decoder (an exported decoder is built at its first decode, about half
    # a second: start-up work, timed by `startup` and the first run, not by every round).
    warm = backend.encode(np.zeros((fast.batch, backend.input_size, backend.input_size), np.float32))
    backend.decode(warm[0], Prompts(box=[0.25 * backend.input_size, 0.25 * backend.input_size,
                                         0.75 * backend.input_size, 0.75 * backend.input_size]))
    intensity = choose_intensity(image.array, image.metadata)
    arr = image.array
    pv = PreparedVolume(arr, image.spacing, 0, intensity, backend.input_size)
    per_round: list[dict] = []
    for _ in range(max(1, rounds)):
        fig: dict = {}
        cache = EmbeddingCache(backend)
        t = time.perf_counter()
        cache.ensure([pv.key(i) for i in range(pv.n_slices)], pv.frame_for_key)
        fig["one_encode_pass_s"] = time.perf_counter() - t
        cache.close()
        del cache

        session = VolumeSession(arr, image.spacing, sam=backend, intensity=intensity)
        decode = _Timed(backend.decode)
        backend.decode = decode  # instance attribute: the engine's calls go through the timer
        encode = _Timed(backend.encode_to_host)
        backend.encode_to_host = encode
        gen = _TimedGenerator(make_generator(DEFAULT_GENERATOR, sam=backend.name))
        per_organ = {}
        results = {}
        t_all = time.perf_counter()
        for organ in organs:
            truth = labels == organ
            if not truth.any():
                raise UserInputError(f"Label {organ} is absent from the label map; pass --organs with labels it holds.")
            zs = np.flatnonzero(truth.any(axis=(1, 2)))
            painted = int(zs[len(zs) // 2])
            example = np.zeros_like(truth)
            example[painted] = truth[painted]
            t = time.perf_counter()
            res = session.segment(example, generator=gen, axis=0)
            dice = 2 * float((res.mask & truth).sum()) / max(1, int(res.mask.sum() + truth.sum()))
            per_organ[_organ_label(organ)] = {"seconds": round(time.perf_counter() - t, 2),
                                                              "dice": round(dice, 4), "painted": painted,
                                                              "slices": len(res.segmented_slices)}
            results[organ] = res
        fig["four_organs_s"] = time.perf_counter() - t_all
        del backend.decode, backend.encode_to_host
        fig["one_organ_s"] = per_organ[_organ_label(organs[0])]["seconds"]
        fig["organs"] = per_organ
        fig["slices_encoded_in_run"] = session.cache.encoded
        fig["encoder_in_run_s"] = encode.seconds
        # Per slice, so that the encoder inside the run compares with its clean pass even where the run
        # encodes fewer slices than the volume holds (a propagation encodes none past where it stops).
        fig["encoder_in_run_over_pass_per_slice"] = ((encode.seconds / max(1, session.cache.encoded))
                                                     / (fig["one_encode_pass_s"] / pv.n_slices))
        fig["generator_s_per_slice"] = gen.generate.seconds / max(1, gen.generate.calls)
        fig["generator_calls"] = gen.generate.calls
        fig["decoder_s_per_call"] = decode.seconds / max(1, decode.calls)
        fig["decoder_calls"] = decode.calls
        fig["four_organs_over_one_encode_pass"] = fig["four_organs_s"] / fig["one_encode_pass_s"]
        # Re-encoding every slice for every organ (the authors' code) pays four encode passes AND the same
        # prompting and decoding; only the generator and decoder time measured in this run is added (the
        # engine's own bookkeeping is left out, so the estimate errs low). The encoder-only estimate (four
        # passes, nothing else) is kept beside it.
        prompt_and_decode = gen.generate.seconds + decode.seconds
        fig["four_organs_reencode_encoder_only_estimate_s"] = len(organs) * fig["one_encode_pass_s"]
        fig["four_organs_reencode_estimate_s"] = fig["four_organs_reencode_encoder_only_estimate_s"] + prompt_and_decode
        fig["speedup_vs_reencode_estimate"] = fig["four_organs_reencode_estimate_s"] / fig["four_organs_s"]
        fig["speedup_vs_reencode_encoder_only_estimate"] = (fig["four_organs_reencode_encoder_only_estimate_s"]
                                                            / fig["four_organs_s"])
        per_round.append(fig)
        log.info("volume round %d: encode pass %.1f s, four organs %.1f s (x%.2f; %d of %d slices encoded, at "
                 "x%.2f the pass's time per slice), vs re-encoding x%.2f",
                 len(per_round), fig["one_encode_pass_s"], fig["four_organs_s"],
                 fig["four_organs_over_one_encode_pass"], session.cache.encoded, pv.n_slices,
                 fig["encoder_in_run_over_pass_per_slice"], fig["speedup_vs_reencode_estimate"])
    out = {k: (_median([r[k] for r in per_round]) if isinstance(v, (int, float)) else v)
           for k, v in per_round[-1].items()}
    out["volume_slices"] = pv.n_slices
    out["encoder_in_pass_s_per_slice"] = out["one_encode_pass_s"] / pv.n_slices
    out["volume_rounds"] = [{k: v for k, v in r.items() if k != "organs"} for r in per_round]
    session.bench_results = results
    return out, session


def bench_rerun(session, repeats: int = 20) -> dict:
    """End-to-end re-run of one slice after a foreground point is added beside its answer: cached
    embedding, the slice's answer as mask input, decoder, back to native pixels, the local correction and
    the click rules (``with_previous_answer``, ``decode_slice``, ``corrected_slice``: what the Slicer module
    calls), median over ``repeats``."""
    from FewShotSAMLib.prompts.base import Prompts

    res = next(iter(session.bench_results.values()))
    candidates = [k for k in res.prompts if k not in res.painted]
    if not candidates:
        raise UserInputError("The first organ produced no propagated slice; the re-run cannot be timed.")
    k = candidates[len(candidates) // 2]
    p = res.prompts[k].model
    pv = session.prepared(res.axis)
    m = pv.mask_to_model(np.take(res.mask, k, axis=res.axis))
    # a foreground click on missed tissue beside the answer: 3 px right of it on its middle row (SAM's
    # answer, the tissue like the click and, where neither takes it, SAM's answer to the point alone)
    rows, cols = np.nonzero(m)
    row = int(rows[np.argmin(np.abs(rows - rows.mean()))])  # a row of the answer nearest its middle
    point = np.array([[row, min(m.shape[1] - 1, int(cols[rows == row].max()) + 3)]], np.float32)
    edited = Prompts(np.concatenate([p.fg_points.reshape(-1, 2), point]), p.bg_points, p.box)
    # a correction, as a point added in Slicer: the slice's answer is SAM's mask input (for a decoder that
    # reads it) and the new answer changes the slice only where the added point asks
    from FewShotSAMLib.volume import slice_to_volume_index

    before = np.take(res.mask, k, axis=res.axis)
    added = slice_to_volume_index(res.axis, k, pv.frame.points_to_native(point))
    no_points = np.zeros((0, 3))

    def correct():
        return session.correct_slice(res.axis, k, edited, before, added, no_points)

    times, parts = [], {"cache_get": [], "decode": [], "to_native": [], "correction": []}
    for _ in range(repeats):
        t = time.perf_counter()
        correct()
        times.append(time.perf_counter() - t)
        # The same work in its parts.
        t0 = time.perf_counter()
        emb = session.cache.get(pv.key(k))
        prompts = session.with_previous_answer(res.axis, [edited], before)[0]
        t1 = time.perf_counter()
        out = session.backend.decode(emb, prompts)
        t2 = time.perf_counter()
        new = pv.frame.to_native(np.where(pv.valid, out.logits, OUTSIDE_LOGIT)) > 0
        t3 = time.perf_counter()
        session.corrected_slice(res.axis, before, new, added, no_points, index=k)
        t4 = time.perf_counter()
        parts["cache_get"].append(t1 - t0)
        parts["decode"].append(t2 - t1)
        parts["to_native"].append(t3 - t2)
        parts["correction"].append(t4 - t3)
    # The same re-run with each decoder runtime the machine has, interleaved (OpenVINO in bfloat16 beside a
    # reduced-precision encoder on a CPU with bfloat16, else ONNX Runtime, is the CPU default; PyTorch is
    # the fallback).
    from FewShotSAMLib.sam.device import onnxruntime_available, openvino_available

    backend = session.backend
    runtime = backend.decoder_runtime
    available = {"openvino": openvino_available(), "onnxruntime": onnxruntime_available(), "torch": True}
    by_runtime: dict = {r: [] for r, ok in available.items() if ok and (r == "torch" or backend.device.type == "cpu")}
    try:
        for _ in range(max(3, repeats // 2)):
            for r in by_runtime:
                backend.decoder_runtime = r
                t = time.perf_counter()
                correct()
                by_runtime[r].append(time.perf_counter() - t)
    finally:
        backend.decoder_runtime = runtime
    out = {"rerun_ms": 1000 * _median(times), "rerun_slice": k, "decoder_runtime": runtime,
           "decoder_precision": backend.decoder_precision,
           "rerun_parts_ms": {name: round(1000 * _median(v), 2) for name, v in parts.items()},
           "rerun_ms_by_decoder_runtime": {r: round(1000 * _median(v), 1) for r, v in by_runtime.items()}}
    if "onnxruntime" in by_runtime:
        out["decoder_onnxruntime_speedup_vs_torch"] = round(_median(by_runtime["torch"]) /
                                                            _median(by_runtime["onnxruntime"]), 2)
        if "openvino" in by_runtime:
            out["decoder_openvino_speedup_vs_onnxruntime"] = round(_median(by_runtime["onnxruntime"]) /
                                                                   _median(by_runtime["openvino"]), 2)
    return out


def bench_rerun_mrml(data_dir: Path) -> dict:
    """The re-run latency through the Slicer module's MRML code (``python tools/lab.py bench-slicer-rerun``
    in a child process, since the library never imports slicer); {} with a note when slicer-core is not
    installed."""
    if importlib.util.find_spec("slicer") is None:
        return {"rerun_mrml_note": "slicer-core is not installed: pip install slicer-core"}
    proc = subprocess.run([sys.executable, str(LAB_SCRIPT), "bench-slicer-rerun", "--data", str(data_dir)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_MRML "):
            return json.loads(line[len("BENCH_MRML "):])
    raise RuntimeError(f"the MRML re-run benchmark failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def bench_startup(volume: Path, labels: Path, organ: int) -> dict:
    """Seconds from launching ``python -m FewShotSAMLib segment`` on ``volume`` until its first slice goes
    to the encoder (wall clock and the child's CPU time), in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="fewshotsam-bench-") as tmp:
        cmd = [sys.executable, "-m", "fewshotsam_lab.bench_child", "startup", "", "segment", str(volume),
               "--example", str(labels), "--label", str(organ), "--output", str(Path(tmp) / "out.nii.gz"),
               "--device", "cpu", "--quiet"]
        env = _child_env()
        cmd[4] = repr(time.time())
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    for line in proc.stderr.splitlines():
        if line.startswith("BENCH_STARTUP "):
            d = json.loads(line[len("BENCH_STARTUP "):])
            return {"startup_to_first_encode_s": d["wall_s"], "startup_cpu_s": d["cpu_s"],
                    "startup_imports_timm": d["timm"], "startup_imports_torchvision": d["torchvision"]}
    raise RuntimeError(f"the start-up child never reached the encoder (exit {proc.returncode}): {proc.stderr[-2000:]}")


def make_large_ct(data_dir: Path, depth: int = 600, size: int = 512):
    """A size x size x depth CT resampled (linear) from the TotalSegmentator example CT over its own field
    of view, and its label map (nearest). Returns (Volume image, Volume labels)."""
    import SimpleITK as sitk

    src, seg = datasets.totalseg_ct(datasets.totalseg_dir(data_dir))
    if not src.exists():
        raise UserInputError(f"The TotalSegmentator CT is missing at {src}; the memory part needs it.")
    img = sitk.ReadImage(str(src))
    lab = sitk.ReadImage(str(seg))
    old_size = np.array(img.GetSize(), float)
    old_spacing = np.array(img.GetSpacing(), float)
    new_size = [size, size, depth]
    new_spacing = old_size * old_spacing / np.array(new_size, float)
    ref = sitk.Image(new_size, img.GetPixelID())
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    ref.SetSpacing([float(s) for s in new_spacing])
    big = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, img.GetPixelID())
    big_lab = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    with tempfile.TemporaryDirectory(prefix="fewshotsam-ct-") as tmp:
        p_img, p_lab = Path(tmp) / "ct.nii.gz", Path(tmp) / "seg.nii.gz"
        sitk.WriteImage(big, str(p_img), useCompression=False)
        sitk.WriteImage(big_lab, str(p_lab), useCompression=False)
        del big, big_lab, img, lab
        return read_volume(p_img), read_volume(p_lab)


def write_large_ct_case(data_dir: Path, out_dir: Path) -> dict:
    """Write the 512 x 512 x 600 CT (:func:`make_large_ct`) and an example with the liver painted on its
    middle slice into ``out_dir`` (uncompressed NIfTI); returns the slicing axis, painted slice and depth."""
    import SimpleITK as sitk

    from FewShotSAMLib.volume import to_sitk

    image, labels = make_large_ct(data_dir)
    liver = labels.array == datasets.TOTALSEG_LIVER
    axis = int(np.argmax(image.array.shape) if image.array.shape.count(max(image.array.shape)) == 1 else 0)
    zs = painted_slices(liver, axis)
    painted = int(zs[len(zs) // 2])
    example = np.zeros(liver.shape, np.uint8)
    idx = [slice(None)] * 3
    idx[axis] = painted
    example[tuple(idx)] = liver[tuple(idx)]
    sitk.WriteImage(to_sitk(image), str(out_dir / "ct.nii"))
    sitk.WriteImage(to_sitk(labels, example), str(out_dir / "example.nii"))
    return {"ct_shape": list(image.array.shape), "ct_dtype": str(image.array.dtype), "axis": axis,
            "painted": painted, "liver_slices": [int(zs[0]), int(zs[-1])], "depth": int(image.array.shape[axis])}


def bench_memory(data_dir: Path, n_slices: int, cap_mb: float, device: str) -> dict:
    """Peak resident memory of ``python -m FewShotSAMLib segment`` on the 512 x 512 x 600 CT, run the way a
    user runs it, in a fresh process whose peak (VmHWM of that process alone) is read after it ends.
    ``n_slices`` 0 = automatic extent; otherwise that many slices around the painted one (forced range).
    The cache cap (``cap_mb``; 0 = the library's default) is passed through FEWSHOTSAM_CACHE_CAP_MB."""
    env = _child_env()
    with tempfile.TemporaryDirectory(prefix="fewshotsam-bench-ct-") as tmp:
        tmp_path = Path(tmp)
        proc = subprocess.run([sys.executable, "-m", "fewshotsam_lab.bench_child", "build-ct", str(data_dir), tmp],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_CT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"building the large CT failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        ct = json.loads(lines[0][len("BENCH_CT "):])
        extent = "auto"
        if n_slices:
            lo = max(0, min(ct["painted"] - n_slices // 2, ct["depth"] - n_slices))
            extent = f"{lo}:{min(ct['depth'] - 1, lo + n_slices - 1)}"
        cmd = [sys.executable, "-m", "FewShotSAMLib", "segment", str(tmp_path / "ct.nii"), "--example",
               str(tmp_path / "example.nii"), "--output", str(tmp_path / "out.nii.gz"), "--range", extent,
               "--device", device, "--quiet"]
        if cap_mb:
            env["FEWSHOTSAM_CACHE_CAP_MB"] = str(cap_mb)
        else:
            env.pop("FEWSHOTSAM_CACHE_CAP_MB", None)
        proc = subprocess.run([sys.executable, "-m", "fewshotsam_lab.bench_child", "measure", *cmd],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_MEMORY ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"the memory measurement failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        got = json.loads(lines[0][len("BENCH_MEMORY "):])
        if got["returncode"]:
            raise RuntimeError(f"segment failed on the large CT (exit {got['returncode']}): {got['stderr']}")
        out_mask = read_volume(tmp_path / "out.nii.gz").array
    axis = ct["axis"]
    seg = painted_slices(out_mask, axis)
    return {**ct, "range": extent, "cache_cap_mb": cap_mb or "library default", "peak_rss_gb": got["peak_rss_gb"],
            "segment_s": got["seconds"], "segmented_slices": [int(seg[0]), int(seg[-1])] if seg.size else [],
            "mask_voxels": int(out_mask.sum())}


# ---- the command ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run the benchmark parts, print a summary and optionally write JSON. Returns the exit code."""
    import torch

    from FewShotSAMLib.sam.device import cpu_has_fast_bf16, onnxruntime_available, openvino_available, resolve_device
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity, read_volume

    if args.threads:
        torch.set_num_threads(int(args.threads))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"encoder", "volume", "rerun", "startup", "memory"}
    if unknown:
        raise UserInputError(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; use encoder, volume, rerun, startup, memory.")
    data_dir = Path(args.data)
    if args.volume:
        vol_path = Path(args.volume)
        if not args.labels:
            raise UserInputError("--volume needs --labels (a label map with the organs) for the whole-volume figures.")
        lab_path = Path(args.labels)
    else:
        vol_path, lab_path = _chaos_default(data_dir)
    organs = [int(v) for v in args.organs.split(",") if v.strip()]
    fast = EncoderVariant.parse(args.fast or library_default_variant())
    device = str(resolve_device(args.device))
    out: dict = {
        "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_has_fast_bf16(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_start": _load_average(), "volume": str(vol_path), "fast_variant": fast.label,
        "plain_variant": PLAIN.label,
    }
    image = read_volume(vol_path, "image")
    labels = read_volume(lab_path, "labels").array

    if "encoder" not in skip:
        names = [v for v in args.variants.split(",") if v.strip()]
        variants = [PLAIN, fast] + [EncoderVariant.parse(v) for v in names]
        if args.variants == DEFAULT_VARIANTS:  # the defaults name runtimes that may not be installed here
            have = {"torch": True, "onnxruntime": onnxruntime_available(), "openvino": openvino_available()}
            variants = [v for v in variants if have[v.runtime]]
        variants = list(dict.fromkeys(variants))
        pv = PreparedVolume(image.array, image.spacing, 0, choose_intensity(image.array, image.metadata), 256)
        mid = pv.n_slices // 2
        idx = [min(pv.n_slices - 1, max(0, mid - args.encoder_slices // 2 + i)) for i in range(args.encoder_slices)]
        frames = np.stack([pv.model_slice(i) for i in idx])
        enc = bench_encoder(frames, variants, device, max(1, args.rounds))
        out["encoder_variants"] = enc
        out["encoder_plain_s_per_slice"] = enc[PLAIN.label]["s_per_slice"]
        out["encoder_s_per_slice"] = enc[fast.label]["s_per_slice"]
        out["encoder_speedup_vs_plain"] = enc[fast.label]["speedup_vs_plain"]
    if "volume" not in skip:
        fig, session = bench_volume(image, labels, organs, fast, device, max(1, args.volume_rounds), args.sam)
        out.update(fig)
        if "encoder_plain_s_per_slice" in out:
            out["four_organs_plain_reencode_estimate_s"] = len(organs) * fig["volume_slices"] * out["encoder_plain_s_per_slice"]
        if "rerun" not in skip:
            out.update(bench_rerun(session))
            out.update(bench_rerun_mrml(data_dir))
    if "startup" not in skip:
        out.update(bench_startup(vol_path, lab_path, organs[0]))
    out["peak_rss_gb_main"] = _peak_rss_gb()
    if "memory" not in skip:
        mem = bench_memory(data_dir, args.memory_slices, args.memory_cap_mb, device)
        out["memory"] = mem
        out["peak_rss_gb"] = mem["peak_rss_gb"]
    else:
        out["peak_rss_gb"] = out["peak_rss_gb_main"]
    out["load_average_end"] = _load_average()
    _print_summary(out)
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2, default=float))
    return 0


def _print_summary(out: dict) -> None:
    """The figures as short lines on stdout."""
    lines = [f"device {out['device']} ({out['threads']} threads, {out['cpu_capability']}, bf16 {out['cpu_bf16']}), "
             f"load average {out['load_average_start']} -> {out['load_average_end']}"]
    for label, d in out.get("encoder_variants", {}).items():
        lines.append(f"encoder {label:24s} {d['s_per_slice']:.3f} s/slice  x{d['speedup_vs_plain']:.2f} vs plain  "
                     f"(max rel diff {d['max_rel_diff']:.1e}, cos {d['mean_cos']:.5f})")
    for key in ("one_encode_pass_s", "four_organs_s", "one_organ_s", "four_organs_over_one_encode_pass",
                "speedup_vs_reencode_estimate", "speedup_vs_reencode_encoder_only_estimate", "generator_s_per_slice", "decoder_s_per_call", "rerun_ms", "rerun_mrml_ms",
                "startup_to_first_encode_s", "startup_cpu_s", "peak_rss_gb"):
        if key in out:
            lines.append(f"{key:34s} {out[key]:.4g}")
    if "organs" in out:
        lines.append("organs: " + ", ".join(f"{k} dice {v['dice']:.3f} ({v['seconds']} s)" for k, v in out["organs"].items()))
    if "memory" in out:
        m = out["memory"]
        lines.append(f"memory: `segment` on CT {m['ct_shape']}, range {m['range']} (segmented {m['segmented_slices']}), "
                     f"cache cap {m['cache_cap_mb']} MB, peak RSS {m['peak_rss_gb']:.2f} GB in {m['segment_s']:.0f} s")
    print("\n".join(lines))
