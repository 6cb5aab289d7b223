"""The SamBackend interface: encode a model-frame slice once, decode any number of prompt sets against it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..prompts.base import Prompts
from .decoder_graph import export_decoder_onnx
from .prompt_embedding import SparsePromptEmbedding

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a torch.device; 'cuda' without CUDA is a UserInputError."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(
                "CUDA was requested but no CUDA GPU is available to PyTorch here; use --device cpu or auto."
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserInputError(f"Unknown device '{device}'; use auto, cpu or cuda.")


PRECISIONS = ("fp32", "bf16", "fp16", "mixed")
PRECISION_ENV = "FEWSHOTSAM_PRECISION"  # fp32 | bf16 | fp16 | mixed | auto: the encoder's arithmetic when not given
COMPILE_ENV = "FEWSHOTSAM_COMPILE"  # 1 to torch.compile the encoder when not given
CHANNELS_LAST_ENV = "FEWSHOTSAM_CHANNELS_LAST"  # 1 for channels-last encoder convolutions when not given
RUNTIME_ENV = "FEWSHOTSAM_RUNTIME"  # auto | torch | onnxruntime | openvino: what runs the encoder when not given
DECODER_RUNTIME_ENV = "FEWSHOTSAM_DECODER_RUNTIME"  # auto | torch | onnxruntime | openvino: what runs the mask decoder
DECODER_THREADS_ENV = "FEWSHOTSAM_DECODER_THREADS"  # threads of the exported decoder (default: torch's)
ONNX_DIR_ENV = "FEWSHOTSAM_ONNX_DIR"  # where exported encoders are kept (default ~/.cache/fewshotsam/onnx)


ENCODER_RUNTIMES = ("torch", "onnxruntime", "openvino")
DECODER_RUNTIMES = ENCODER_RUNTIMES


def _onnx_dir() -> "os.PathLike":
    from pathlib import Path

    return Path(os.environ.get(ONNX_DIR_ENV) or Path.home() / ".cache" / "fewshotsam" / "onnx")


def weights_digest(encoder: torch.nn.Module) -> str:
    """SHA-1 of a module's weights (names and values): what exported files are named after."""
    import hashlib

    digest = hashlib.sha1()
    for key, value in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_encoder_onnx(encoder: torch.nn.Module, name: str, input_size: int, *, part: str = "",
                        module: Optional[torch.nn.Module] = None,
                        example: Optional[Callable[[], torch.Tensor]] = None,
                        digest: Optional[str] = None) -> "os.PathLike":
    """The image encoder (or ``module``, its ``part``, fed ``example()``) exported once to ONNX at batch 1
    (file named after the encoder's weights' digest, kept in FEWSHOTSAM_ONNX_DIR, written atomically);
    returns its path. Batch 1 because encoders such as TinyViT read the batch size as a Python number,
    which a trace freezes. ``example`` is called only when the file has to be written."""
    digest = digest or weights_digest(encoder)
    path = _onnx_dir() / f"{name}-{input_size}-b1{'-' + part if part else ''}-{digest[:16]}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        log.info("exporting the %s encoder%s to %s (once per machine)", name, f" ({part})" if part else "", path)
        module = (module or encoder).cpu().eval()
        with torch.no_grad():
            x = example() if example is not None else torch.zeros(1, 3, input_size, input_size)
            torch.onnx.export(module, x, str(tmp), input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    return path


def _encoder_structure(encoder: torch.nn.Module) -> Optional[str]:
    """'tinyvit' (LiteMedSAM, MobileSAM), 'vit' (SAM ViT-B/L/H) or None for an encoder of another structure."""
    if all(hasattr(encoder, a) for a in ("patch_embed", "layers", "neck")):
        return "tinyvit"
    if all(hasattr(encoder, a) for a in ("patch_embed", "blocks", "neck", "pos_embed")):
        return "vit"
    return None


class _EncoderPart(torch.nn.Module):
    """A part of a TinyViT or ViT image encoder, sharing its modules."""

    def __init__(self, encoder: torch.nn.Module, structure: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.tinyvit = structure == "tinyvit"


class _EncoderStem(_EncoderPart):
    """The first, full-resolution part of an image encoder, which precision 'mixed' keeps in float32:
    TinyViT's patch embedding and convolutional first stage (LiteMedSAM, MobileSAM), or ViT's patch and
    position embedding (SAM ViT-B/L/H). Its rounding in bfloat16 costs the most accuracy for the least
    time (docs/PERFORMANCE.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        if self.tinyvit:
            return e.layers[0](e.patch_embed(x))
        x = e.patch_embed(x)
        return x + e.pos_embed if e.pos_embed is not None else x


class _EncoderRest(_EncoderPart):
    """The image encoder after :class:`_EncoderStem` (stem then rest = the whole encoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        if self.tinyvit:
            for layer in e.layers[1:]:
                x = layer(x)
            b, _, c = x.shape
            return e.neck(x.view(b, 64, 64, c).permute(0, 3, 1, 2))  # TinyViT's own fixed 64x64 grid
        for block in e.blocks:
            x = block(x)
        return e.neck(x.permute(0, 3, 1, 2))


def split_encoder(encoder: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stem, rest) of a TinyViT or SAM ViT image encoder, sharing its weights; ``rest(stem(x))`` equals
    ``encoder(x)``. A UserInputError for an encoder of another structure."""
    structure = _encoder_structure(encoder)
    if structure is None:
        raise UserInputError(f"Precision 'mixed' needs a TinyViT or ViT image encoder, not {type(encoder).__name__}; "
                             "use precision fp32 or bf16.")
    return _EncoderStem(encoder, structure), _EncoderRest(encoder, structure)


class OnnxEncoder:
    """The exported image encoder run by ONNX Runtime on CPU in float32, one slice per run."""

    slices_per_run = 1  # a batch costs what its slices cost one by one

    def __init__(self, encoder: torch.nn.Module, name: str, input_size: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UserInputError("The onnxruntime encoder needs the onnxruntime and onnx packages: "
                                 "pip install onnxruntime onnx, or use the torch runtime.") from exc
        self.path = export_encoder_onnx(encoder, name, input_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(np.concatenate([self.session.run(None, {"x": x[i:i + 1]})[0]
                                                for i in range(len(x))]))


def _openvino_request(core, model, precision: str, threads: int, cache_dir: Optional[str] = None):
    """An inference request of ``model`` (a path or an OpenVINO model) compiled for the CPU with the latency
    hint, ``threads`` threads and inference precision 'fp32' or 'bf16' (kept in ``cache_dir`` if given)."""
    config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if cache_dir:
        config["CACHE_DIR"] = cache_dir
    return core.compile_model(model, "CPU", config).create_infer_request()


class _Float32Rerun:
    """The float32 request that answers again where a reduced-precision OpenVINO request gave non-finite
    values (``what`` names the model in the warning); compiled by ``compile_fp32()`` at the first need."""

    def __init__(self, compile_fp32: Callable[[], object], what: str) -> None:
        self._compile = compile_fp32
        self._request = None
        self.what = what
        self.count = 0  # answers replaced so far

    def infer(self, inputs: dict):
        if self._request is None:
            log.warning("the %s gave non-finite values; such inputs are run again in float32", self.what)
            self._request = self._compile()
        self.count += 1
        return self._request.infer(inputs)

    def mend(self, outputs: tuple, inputs: dict) -> tuple:
        """``outputs`` when all are finite, else the float32 answers to ``inputs`` (copies, one per output)."""
        if all(np.isfinite(o).all() for o in outputs):
            return outputs
        answer = self.infer(inputs)
        return tuple(np.array(answer[i]) for i in range(len(outputs)))


class OpenVinoEncoder:
    """The exported image encoder compiled by OpenVINO for the CPU, one slice per run, in float32,
    bfloat16 (OpenVINO's inference precision: bfloat16 matrix products where the CPU has them, float32
    elsewhere) or 'mixed' (the stem of :func:`split_encoder` in float32, the rest in bfloat16: two
    compiled models run one after the other). The compiled models are kept beside the ONNX files
    (OpenVINO's model cache), so only the first run on a machine pays for the compilation. A slice whose
    reduced-precision embedding is not finite (seen with random weights, never on the CHAOS volumes) is
    encoded again in float32."""

    slices_per_run = 1  # a batch costs what its slices cost one by one

    def __init__(self, encoder: torch.nn.Module, name: str, input_size: int, precision: str) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise UserInputError("The openvino encoder needs the openvino and onnx packages: "
                                 "pip install openvino onnx, or use the torch runtime.") from exc
        self._core = ov.Core()
        self.precision = precision
        if precision == "mixed":
            stem, rest = split_encoder(encoder)
            digest = weights_digest(encoder)
            self.path = export_encoder_onnx(encoder, name, input_size, part="stem", module=stem, digest=digest)
            self.rest_path = export_encoder_onnx(
                encoder, name, input_size, part="rest", module=rest, digest=digest,
                example=lambda: stem.cpu().eval()(torch.zeros(1, 3, input_size, input_size)))
            self.stages = [self._compile(self.path, "fp32"), self._compile(self.rest_path, "bf16")]
        else:
            self.path = self.rest_path = export_encoder_onnx(encoder, name, input_size)
            self.stages = [self._compile(self.path, precision)]
        self._fp32 = _Float32Rerun(lambda: self._compile(self.rest_path, "fp32"), f"{precision} encoder")

    @property
    def fallbacks(self) -> int:
        """Slices encoded again in float32."""
        return self._fp32.count

    def _compile(self, path: "os.PathLike", precision: str):
        return _openvino_request(self._core, str(path), precision, torch.get_num_threads(),
                                 cache_dir=str(_onnx_dir() / "openvino-cache"))

    def _one(self, x: np.ndarray) -> np.ndarray:
        for stage in self.stages[:-1]:  # x becomes the last stage's input (the float32 stem's output)
            x = stage.infer({0: x})[0].copy()
        y = self.stages[-1].infer({0: x})[0].copy()
        return y if self.precision == "fp32" else self._fp32.mend((y,), {0: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))]))


def onnxruntime_available() -> bool:
    """True when the onnxruntime package can be imported."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True when the openvino package can be imported."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def decoder_threads() -> int:
    """Threads of an exported decoder's runtime: FEWSHOTSAM_DECODER_THREADS, else torch's thread count, so
    that a caller who keeps torch to one thread (small numpy/torch work between decodes) still decodes on
    every core."""
    return int(os.environ.get(DECODER_THREADS_ENV) or torch.get_num_threads())


class _ExportedDecoder:
    """Common part of the exported decoders (sam/decoder_graph.py): called with the (1, C, h, w) float32
    CPU embedding, the sparse prompt tokens and the dense prompt (None without a mask input); returns
    (masks (1, M, h', w'), iou (1, M)) as torch tensors. Two graphs: one with the "no mask" dense prompt
    built in (built with the runner), one taking a dense prompt (built at the first mask input)."""

    def __init__(self, decoder: torch.nn.Module, pe: torch.Tensor, no_mask: torch.Tensor) -> None:
        self._decoder, self._pe, self._no_mask = decoder, pe.detach().float().cpu(), no_mask.detach().float().cpu()
        self._runs: dict = {False: self._build(False)}

    def _build(self, with_mask: bool) -> Callable[[dict], tuple]:
        """A function of a feed dict returning (masks, iou) as numpy arrays."""
        raise NotImplementedError

    def _graph(self, with_mask: bool, pixels_major: bool = False) -> bytes:
        return export_decoder_onnx(self._decoder, self._pe, pixels_major=pixels_major,
                                   no_mask=None if with_mask else self._no_mask)

    @staticmethod
    def _numpy(t: torch.Tensor) -> np.ndarray:
        # float32 contiguous CPU tensors (what decode passes) convert without a copy
        return t.detach().float().contiguous().numpy()

    def _feed(self, emb: torch.Tensor, sparse: torch.Tensor, dense: Optional[torch.Tensor]) -> dict:
        feed = {"emb": self._numpy(emb), "sparse": self._numpy(sparse)}
        if dense is not None:
            feed["dense"] = self._numpy(dense.expand_as(emb))
        return feed

    def __call__(self, emb: torch.Tensor, sparse: torch.Tensor, dense: Optional[torch.Tensor] = None):
        with_mask = dense is not None
        run = self._runs.get(with_mask)
        if run is None:
            run = self._runs[with_mask] = self._build(with_mask)
        masks, iou = run(self._feed(emb, sparse, dense))
        return torch.from_numpy(masks), torch.from_numpy(iou)


class OnnxDecoder(_ExportedDecoder):
    """The mask decoder exported to ONNX in memory (about a second per graph) and run by ONNX Runtime on
    CPU in float32; the number of prompt tokens is a dynamic axis."""

    def _build(self, with_mask: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = decoder_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # its worker threads sleep when a decode ends instead of spinning on the cores that the encoder,
        # the generators and (in Slicer) the application need next (docs/PERFORMANCE.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(self._graph(with_mask), options, providers=["CPUExecutionProvider"])
        return lambda feed: tuple(session.run(None, feed))


class OpenVinoDecoder(_ExportedDecoder):
    """The mask decoder exported to ONNX in memory and compiled by OpenVINO for the CPU (about 0.2 s per
    graph) in float32 or bfloat16 (OpenVINO's inference precision: bfloat16 matrix products where the CPU
    has them); the number of prompt tokens stays dynamic. The graph works on (pixels, channels); OpenVINO's
    preprocessing transposes the (C, h*w) embedding into it once, at the input (a transpose inside the
    graph was moved by OpenVINO into two of its consumers and ran twice). A decode whose bfloat16 answer is
    not finite is run again in float32 (compiled when first needed)."""

    def __init__(self, decoder: torch.nn.Module, pe: torch.Tensor, no_mask: torch.Tensor,
                 precision: str = "bf16") -> None:
        import openvino as ov

        if precision not in ("fp32", "bf16"):
            raise UserInputError(f"The openvino decoder runs in fp32 or bf16, not '{precision}'.")
        self.precision = precision
        self._core = ov.Core()
        self._reruns: list[_Float32Rerun] = []
        super().__init__(decoder, pe, no_mask)

    @property
    def fallbacks(self) -> int:
        """Decodes run again in float32."""
        return sum(r.count for r in self._reruns)

    def _build(self, with_mask: bool):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        model = self._core.read_model(self._graph(with_mask, pixels_major=True))
        ppp = PrePostProcessor(model)
        for name in ("emb", "dense") if with_mask else ("emb",):
            ppp.input(name).tensor().set_layout(ov.Layout("NCH"))
            ppp.input(name).model().set_layout(ov.Layout("NHC"))
        model = ppp.build()
        run = _OpenVinoRun(_openvino_request(self._core, model, self.precision, decoder_threads()),
                           _Float32Rerun(lambda: _openvino_request(self._core, model, "fp32", decoder_threads()),
                                         "bfloat16 decoder") if self.precision != "fp32" else None)
        if run.rerun is not None:
            self._reruns.append(run.rerun)
        return run

    def _feed(self, emb: torch.Tensor, sparse: torch.Tensor, dense: Optional[torch.Tensor]) -> dict:
        # (1, C, h, w) -> (1, C, h*w), the layout the preprocessing transposes (a view, no copy)
        return {k: v if k == "sparse" else v.reshape(v.shape[0], v.shape[1], -1)
                for k, v in super()._feed(emb, sparse, dense).items()}


class _OpenVinoRun:
    """One compiled decoder graph: its request, and the float32 re-run of non-finite bfloat16 answers."""

    def __init__(self, request, rerun: Optional[_Float32Rerun]) -> None:
        self.request, self.rerun = request, rerun

    def __call__(self, feed: dict) -> tuple:
        out = self.request.infer(feed, share_inputs=True)  # the arrays are read in place, not copied
        masks, iou = out[0], out[1]
        return (masks, iou) if self.rerun is None else self.rerun.mend((masks, iou), feed)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions (AVX-512 BF16 or AMX) for oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _requested_precision(precision: Optional[str]) -> str:
    """The precision asked for: the argument, else FEWSHOTSAM_PRECISION, else 'auto' (lower case)."""
    return (precision or os.environ.get(PRECISION_ENV) or "auto").lower()


def resolve_precision(precision: Optional[str], device: torch.device, mixed_is_fast: bool = False) -> str:
    """The encoder's arithmetic: 'fp32' (plain), 'bf16' (CPU or CUDA autocast), 'mixed' (the encoder's
    stem in float32, the rest in bfloat16, see :func:`split_encoder`) or 'fp16' (CUDA autocast).

    ``None`` reads the ``FEWSHOTSAM_PRECISION`` environment variable; unset means 'auto': 'fp16' on CUDA;
    on CPU 'mixed' when the CPU has native bfloat16 and ``mixed_is_fast`` (the caller runs the encoder in
    OpenVINO, where 'mixed' is about 1.4x faster than float32 at the same accuracy, docs/PERFORMANCE.md),
    else 'fp32'.
    """
    name = _requested_precision(precision)
    if name == "auto":
        name = "fp16" if device.type == "cuda" else ("mixed" if mixed_is_fast and cpu_has_fast_bf16() else "fp32")
    if name not in PRECISIONS:
        raise UserInputError(f"Unknown precision '{precision or os.environ.get(PRECISION_ENV)}'; use fp32, bf16, mixed, fp16 or auto.")
    if name == "fp16" and device.type != "cuda":
        raise UserInputError("float16 encoding is for CUDA GPUs; on CPU use precision mixed, bf16 or fp32.")
    return name


def fuse_conv_bn(module: torch.nn.Module) -> int:
    """Fold every eval-mode (Conv2d, BatchNorm2d) pair held as a two-module Sequential (TinyViT's
    ``Conv2d_BN``) into one Conv2d with a bias, in place. Returns the number of pairs folded."""
    n = 0
    for name, child in list(module.named_children()):
        parts = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
        if (len(parts) == 2 and isinstance(parts[0], torch.nn.Conv2d) and isinstance(parts[1], torch.nn.BatchNorm2d)
                and parts[1].track_running_stats and parts[1].running_var is not None):
            conv, bn = parts
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
            setattr(module, name, fused)
            n += 1
        else:
            n += fuse_conv_bn(child)
    return n


@dataclass
class DecodeResult:
    """SAM's answer for one prompt set: model-frame logits (S, S), its predicted IoU, low-res logits."""

    logits: np.ndarray  # (S, S) float32, > 0 is foreground
    score: float
    low_res: np.ndarray  # (256, 256) float32, reusable as mask_input

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask in the model frame."""
        return self.logits > 0


class SamBackend:
    """Common code of all SAM families. Subclasses build ``self.model`` (a SAM-like module with
    ``image_encoder``, ``prompt_encoder``, ``mask_decoder``) and set the class attributes.

    Frames given to :meth:`encode` are model-frame slices, (B, S, S) float32 scaled to [0, 1].

    Speed options (see docs/PERFORMANCE.md): ``precision`` 'fp32' | 'bf16' | 'fp16' (autocast of the
    encoder; None reads FEWSHOTSAM_PRECISION), ``fuse`` (fold BatchNorm into the convolutions, same
    values up to rounding; changes the model's state-dict keys, so off unless a family turns it on),
    ``channels_last`` (memory layout of the encoder's convolutions; None reads
    FEWSHOTSAM_CHANNELS_LAST), ``compile``
    (torch.compile of the encoder; None reads FEWSHOTSAM_COMPILE). ``precision='fp32', fuse=False,
    channels_last=False, compile=False, runtime='torch'`` is the plain eager path. ``runtime`` (None reads
    FEWSHOTSAM_RUNTIME, unset = 'auto'): 'torch'; 'onnxruntime' (CPU, fp32) or 'openvino' (CPU, fp32 or
    bf16) run the encoder exported to ONNX; 'auto' = OpenVINO on CPU for families whose encoder exports
    quickly (``auto_export_encoder``, LiteMedSAM) when the package is installed, else PyTorch, and PyTorch
    when the export or compilation fails.
    ``decoder_runtime`` (None reads FEWSHOTSAM_DECODER_RUNTIME, unset = 'auto'): 'torch'; 'onnxruntime'
    (CPU, float32); 'openvino' (CPU, bfloat16 when the encoder's precision is 'bf16' or 'mixed', else
    float32); 'auto' = OpenVINO in bfloat16 where the encoder runs in reduced precision on a CPU with native
    bfloat16, else ONNX Runtime on CPU (float32), else PyTorch; an automatically chosen exported decoder that
    fails to build leaves the next one (docs/PERFORMANCE.md). ``decoder_precision`` says which arithmetic
    the decoder runs in.
    """

    name: str = "sam"  # the model: image encoder and decoder weights (what results are reported under)
    encoder_name: Optional[str] = None  # the image encoder's weights when models share it (embeddings); None = name
    input_size: int = 1024
    prefers_box: bool = False  # trained with boxes: feed it a box whenever there is one
    batch_size: int = 4
    auto_export_encoder: bool = False  # runtime 'auto' may export the encoder (small encoders only)

    def previous_answer_input(self, mask: np.ndarray) -> Optional[np.ndarray]:
        """The mask input that shows the decoder the answer being corrected (``mask``: bool, model frame),
        or None when the decoder was not trained to read one (then a corrective re-run sees only the
        points and the box)."""
        return None

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "auto", *,
                 precision: Optional[str] = None, fuse: bool = False, channels_last: Optional[bool] = None,
                 compile: Optional[bool] = None, runtime: Optional[str] = None,
                 decoder_runtime: Optional[str] = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "0").strip().lower() in ("1", "true", "yes")
        self.compiled = bool(compile)
        self.runtime = (runtime or os.environ.get(RUNTIME_ENV) or "auto").lower()
        if self.runtime not in ENCODER_RUNTIMES + ("auto",):
            raise UserInputError(f"Unknown encoder runtime '{self.runtime}'; use auto, {', '.join(ENCODER_RUNTIMES)}.")
        self.precision = resolve_precision(precision, self.device, self._openvino_will_run())
        self.fused = fuse_conv_bn(self.model.image_encoder) if fuse and hasattr(self.model, "image_encoder") else 0
        if channels_last is None:
            channels_last = os.environ.get(CHANNELS_LAST_ENV, "0").strip().lower() in ("1", "true", "yes")
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)
        self._encoder = torch.compile(self.model.image_encoder, dynamic=False) if self.compiled else None
        if self.runtime == "auto":
            self.runtime = "torch"
            if (self.auto_export_encoder and self.device.type == "cpu" and self.precision in ("fp32", "bf16", "mixed")
                    and not self.compiled and openvino_available()):
                try:
                    self._encoder = OpenVinoEncoder(self.model.image_encoder, self.embedding_name, self.input_size,
                                                    self.precision)
                    self.runtime = "openvino"
                except Exception as exc:  # any failure of the optional fast path leaves the plain one
                    log.warning("OpenVINO could not take the %s encoder (%s); PyTorch runs it", self.name, exc)
                    if self.precision == "mixed" and _requested_precision(precision) == "auto":
                        self.precision = "fp32"  # 'auto' chose mixed for OpenVINO; in PyTorch it is no faster
        if self.runtime == "onnxruntime":
            if self.device.type != "cpu" or self.precision != "fp32" or self.compiled:
                raise UserInputError("The onnxruntime encoder runs on CPU in fp32 without torch.compile; "
                                     "choose device cpu and precision fp32, or the torch runtime.")
            self._encoder = OnnxEncoder(self.model.image_encoder, self.embedding_name, self.input_size)
        elif self.runtime == "openvino":
            if self.device.type != "cpu" or self.precision not in ("fp32", "bf16", "mixed") or self.compiled:
                raise UserInputError("The openvino encoder runs on CPU in fp32, bf16 or mixed without torch.compile; "
                                     "choose device cpu and one of those precisions, or the torch runtime.")
            self._encoder = OpenVinoEncoder(self.model.image_encoder, self.embedding_name, self.input_size, self.precision)
        self._split: Optional[tuple[torch.nn.Module, torch.nn.Module]] = None  # precision 'mixed' in PyTorch
        if self.runtime == "torch" and self.precision == "mixed":
            self._split = split_encoder(self.model.image_encoder)
            if self.compiled:
                self._split = tuple(torch.compile(part, dynamic=False) for part in self._split)
        self._decoder_runtime_asked = (decoder_runtime or os.environ.get(DECODER_RUNTIME_ENV) or "auto").lower()
        self.decoder_runtime = self._resolve_decoder_runtime(self._decoder_runtime_asked)
        self._exported_decoders: dict[str, _ExportedDecoder] = {}
        self._sparse_embedding: Optional[SparsePromptEmbedding] = None

    def _openvino_will_run(self) -> bool:
        """True when OpenVINO is to run this encoder on CPU (asked for, or chosen by runtime 'auto'), so that
        precision 'auto' may pick 'mixed' (in PyTorch 'mixed' is no faster than float32 on CPU)."""
        if self.device.type != "cpu" or self.compiled or self.runtime not in ("auto", "openvino"):
            return False
        if self.runtime == "auto" and not self.auto_export_encoder:
            return False
        return _encoder_structure(self.model.image_encoder) is not None and openvino_available()

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype PyTorch's autocast runs the encoder (for 'mixed': its rest) in; None for float32."""
        return {"fp32": None, "bf16": torch.bfloat16, "mixed": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def _resolve_decoder_runtime(self, name: str) -> str:
        if name not in ("auto",) + DECODER_RUNTIMES:
            raise UserInputError(f"Unknown decoder runtime '{name}'; use auto, {', '.join(DECODER_RUNTIMES)}.")
        if name == "auto":
            if self.device.type != "cpu":
                return "torch"
            if self.precision in ("bf16", "mixed") and cpu_has_fast_bf16() and openvino_available():
                return "openvino"
            return "onnxruntime" if onnxruntime_available() else "torch"
        if name != "torch":
            if self.device.type != "cpu":
                raise UserInputError(f"The {name} decoder runs on CPU; choose device cpu or the torch decoder.")
            if not (onnxruntime_available() if name == "onnxruntime" else openvino_available()):
                raise UserInputError(f"The {name} decoder needs the {name} and onnx packages: "
                                     f"pip install {name} onnx, or use the torch decoder.")
        return name

    @property
    def encode_ahead(self) -> int:
        """Slices a propagation encodes together (the slice it needs now and the next ones along its run):
        ``batch_size`` where a batch encodes faster than its slices one by one (PyTorch, CUDA: a stop may
        leave up to ``batch_size - 1`` of them unused), 1 where the encoder runs slice by slice anyway
        (OpenVINO, ONNX Runtime: no slice past the one where a propagation stops is encoded)."""
        if getattr(self._encoder, "slices_per_run", None) == 1:
            return 1
        return max(1, int(self.batch_size))

    @property
    def decoder_precision(self) -> str:
        """The decoder's arithmetic: 'bf16' for the OpenVINO decoder beside a reduced-precision encoder,
        else 'fp32' (the PyTorch decoder is never autocast)."""
        return "bf16" if self.decoder_runtime == "openvino" and self.precision in ("bf16", "mixed") else "fp32"

    @property
    def cache_name(self) -> str:
        """Folder name of this backend's persistent embeddings: the family, plus the precision when it is
        not float32, so that embeddings computed with different arithmetic are never mixed."""
        if self.precision == "fp32":
            return self.embedding_name
        # bfloat16 in OpenVINO (its own choice of which operations round) is not torch's autocast
        return f"{self.embedding_name}-{self.precision}{'-openvino' if self.runtime == 'openvino' else ''}"

    @property
    def embedding_name(self) -> str:
        """What the embeddings are named after: the image encoder's weights (``encoder_name``), shared by
        models that differ only in their decoder (LiteMedSAM and its point-aware variant)."""
        return self.encoder_name or self.name

    def describe(self) -> str:
        """One line naming the encoder's speed options (for logs and the benchmark)."""
        return (f"{self.name} on {self.device}: {self.precision}, batch {self.batch_size}"
                f"{', BN folded' if self.fused else ''}{', channels-last' if self.channels_last else ''}"
                f"{', compiled' if self.compiled else ''}"
                f"{', ONNX Runtime' if self.runtime == 'onnxruntime' else ''}"
                f"{', OpenVINO' if self.runtime == 'openvino' else ''}, decoder {self.decoder_runtime} "
                f"{self.decoder_precision}, "
                f"{torch.get_num_threads()} threads")

    # ---- encoding -------------------------------------------------------------------------------
    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, S, S) in [0, 1] -> (B, 3, S, S) as the encoder expects. Subclasses override."""
        return frames[:, None].expand(-1, 3, -1, -1)

    def _to_device(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, S, S) or (S, S) frames -> float32 tensor on the device; one (pinned, non-blocking) copy."""
        x = torch.as_tensor(np.asarray(frames, dtype=np.float32) if not torch.is_tensor(frames) else frames)
        if x.ndim == 2:
            x = x[None]
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"frames must be {self.input_size}x{self.input_size}, got {tuple(x.shape)}")
        if self.device.type == "cuda":
            return x.to(torch.float32).pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device, torch.float32)

    def _run_encoder(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The encoder's raw output (B, C, h, w) on the device, in the autocast dtype when there is one."""
        x = self._normalise(self._to_device(frames))
        if self.runtime != "torch":  # OpenVINO / ONNX Runtime run their own precision and layout
            return self._encoder(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._split is not None:  # 'mixed': the stem in float32, the rest under bfloat16 autocast
            stem, rest = self._split
            x = stem(x)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return rest(x)
        encoder = self._encoder or self.model.image_encoder
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return encoder(x)
        return encoder(x)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode (B, S, S) model-frame slices in [0, 1]; returns (B, C, h, w) float32 on self.device."""
        return self._run_encoder(frames).float().contiguous()

    @torch.inference_mode()
    def encode_to_host(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """Encode like :meth:`encode` and return (B, C, h, w) float16 numpy on the host, converted on the
        device first so that one batch makes one half-size device-to-host copy (what the cache stores)."""
        emb = self._run_encoder(frames).to(torch.float16).contiguous()
        return emb.cpu().numpy()

    # ---- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, prompts: Prompts, multimask: bool = False) -> DecodeResult:
        """Decode one prompt set against one (C, h, w) embedding."""
        emb = self._decoder_embedding(embedding)
        coords, labels = [], []
        for pts, lab in ((prompts.fg_points, 1), (prompts.bg_points, 0)):
            if len(pts):
                coords.append(np.asarray(pts, np.float32)[:, ::-1])  # (row, col) -> (x, y)
                labels.append(np.full(len(pts), lab))
        box = None
        if prompts.box is not None:
            r0, c0, r1, c1 = [float(v) for v in prompts.box]
            box = np.array([c0, r0, c1, r1], np.float32)
        if not coords and box is None and prompts.mask_input is None:
            raise ValueError("decode needs at least one point, a box or a mask input")
        # Points and box corners are embedded in numpy (SAM's own arithmetic and weights; a padding point
        # closes a sequence without a box, as in SAM's predictor): in PyTorch these tiny operations wait
        # for the thread pool on every decode (sam/prompt_embedding.py).
        if self._sparse_embedding is None:
            self._sparse_embedding = SparsePromptEmbedding(self.model.prompt_encoder)
        sparse_np = self._sparse_embedding(np.concatenate(coords) if coords else None,
                                           np.concatenate(labels) if labels else None, box)
        sparse = torch.from_numpy(sparse_np)[None].to(self.device)
        dense = None  # no mask input: the prompt encoder's learnt "no mask" vector
        if prompts.mask_input is not None:
            masks = torch.as_tensor(prompts.mask_input, dtype=torch.float32, device=self.device)[None, None]
            dense = self.model.prompt_encoder(points=None, boxes=None, masks=masks)[1]
        low, iou = self._predict_masks(emb, sparse, dense)
        if multimask:
            best = 1 + int(torch.argmax(iou[0, 1:]))
        else:
            best = 0
        low, iou = low[:, best : best + 1], iou[:, best : best + 1]
        low_np = low[0, 0].float().cpu().numpy()
        if tuple(low.shape[-2:]) == (self.input_size, self.input_size):
            logits = low_np.copy()  # bilinear resampling to the same size is the identity
        else:
            logits = F.interpolate(low, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)[0, 0].float().cpu().numpy()
        return DecodeResult(logits=logits, score=float(iou[0, 0]), low_res=low_np)

    def _decoder_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) float32 contiguous on the device. The conversion of the last embedding is kept, so
        the several decodes a generator makes on one slice convert it (float16 from the cache) once."""
        last = getattr(self, "_last_embedding", None)
        if last is not None and last[0] is embedding:  # embeddings are never modified in place
            return last[1]
        emb = embedding.to(self.device, torch.float32)
        emb = (emb[None] if emb.ndim == 3 else emb).contiguous()
        self._last_embedding = (embedding, emb)
        return emb

    def _predict_masks(self, emb: torch.Tensor, sparse: torch.Tensor, dense: Optional[torch.Tensor]):
        """Every mask token's low-res mask and score, from PyTorch, ONNX Runtime or OpenVINO
        (``decoder_runtime``; the exported decoders are built at the first decode). ``dense`` is None
        without a mask input."""
        pe = self._dense_pe()
        while self.decoder_runtime != "torch":
            key = f"{self.decoder_runtime}-{self.decoder_precision}"
            runner = self._exported_decoders.get(key)
            if runner is None:
                no_mask = self.model.prompt_encoder.no_mask_embed.weight
                try:
                    if self.decoder_runtime == "openvino":
                        runner = OpenVinoDecoder(self.model.mask_decoder, pe, no_mask, self.decoder_precision)
                    else:
                        runner = OnnxDecoder(self.model.mask_decoder, pe, no_mask)
                except Exception as exc:  # an automatically chosen fast path that fails leaves the next one
                    if self._decoder_runtime_asked != "auto":
                        raise
                    ort_next = self.decoder_runtime == "openvino" and onnxruntime_available()
                    fallback = "onnxruntime" if ort_next else "torch"
                    log.warning("the %s decoder could not be built (%s); %s runs it", self.decoder_runtime, exc,
                                fallback)
                    self.decoder_runtime = fallback
                    continue
                self._exported_decoders[key] = runner
            return runner(emb, sparse, dense)
        return self.model.mask_decoder.predict_masks(
            image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=self._no_mask_dense() if dense is None else dense)

    def _no_mask_dense(self) -> torch.Tensor:
        """The dense prompt without a mask input: the learnt "no mask" vector broadcast over the grid (a
        view, as the prompt encoder makes it)."""
        enc = self.model.prompt_encoder
        h, w = enc.image_embedding_size
        return enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid (depends on weights only: made
        once per backend instead of once per decode)."""
        pe = getattr(self, "_dense_pe_cache", None)
        if pe is None:
            pe = self.model.prompt_encoder.get_dense_pe().to(self.device).contiguous()
            self._dense_pe_cache = pe
        return pe
