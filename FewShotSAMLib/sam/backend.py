"""``SamBackend``: encode a model-frame slice once, decode any number of prompt sets against it.

What runs the encoder and the decoder (PyTorch, ONNX Runtime, OpenVINO) is chosen in
sam/runtime_choice.py and run by sam/encoder_runtimes.py and sam/decoder_runtimes.py; the device and the
precision come from sam/device.py; the settings not given as arguments from a ``RuntimeOptions``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..options import RuntimeOptions, default_options
from ..prompt_types import Prompts
from . import runtime_choice as choice
from .device import resolve_device, resolve_precision
from .encoder_parts import fuse_conv_bn, split_encoder
from .prompt_embedding import SparsePromptEmbedding

log = logging.getLogger(__name__)


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

    Speed options (see docs/PERFORMANCE.md); each one left None takes its value from ``options`` (a
    :class:`RuntimeOptions`; None: :func:`default_options`, the FEWSHOTSAM_* environment variables).
    ``precision`` 'auto' | 'fp32' | 'bf16' | 'mixed' | 'fp16' (the encoder's arithmetic, sam/device.py);
    ``fuse`` (fold BatchNorm into the convolutions, same values up to rounding; changes the model's
    state-dict keys, so off unless a family turns it on); ``channels_last`` (memory layout of the
    encoder's convolutions); ``compile`` (torch.compile of the encoder). ``precision='fp32', fuse=False,
    channels_last=False, compile=False, runtime='torch'`` is the plain eager path. ``runtime``: 'torch';
    'onnxruntime' (CPU, fp32) or 'openvino' (CPU, fp32, bf16 or mixed) run the encoder exported to ONNX;
    'auto' = OpenVINO on CPU for families whose encoder exports quickly (``auto_export_encoder``,
    LiteMedSAM) when the package is installed, else PyTorch, and PyTorch when the export or compilation
    fails. ``decoder_runtime``: 'torch'; 'onnxruntime' (CPU, float32); 'openvino' (CPU, bfloat16 when the
    encoder's precision is 'bf16' or 'mixed', else float32); 'auto' = OpenVINO in bfloat16 where the
    encoder runs in reduced precision on a CPU with native bfloat16, else ONNX Runtime on CPU (float32),
    else PyTorch; an automatically chosen exported decoder that fails to build leaves the next one.
    ``decoder_precision`` says which arithmetic the decoder runs in.
    """

    name: str = "sam"  # the model: image encoder and decoder weights (what results are reported under)
    encoder_name: Optional[str] = None  # the image encoder's weights when models share it (embeddings); None = name
    input_size: int = 1024
    prefers_box: bool = False  # trained with boxes: feed it a box whenever there is one
    # box propagation may widen the neighbour's box where this model's answer reaches it (measured to help
    # LiteMedSAM; MobileSAM's answers on CHAOS fall with it, 73.28 -> 68.08: docs/RESULTS.md)
    grows_box: bool = False
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
                 decoder_runtime: Optional[str] = None, options: Optional[RuntimeOptions] = None) -> None:
        self.options = options = options if options is not None else default_options()
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.compiled = bool(options.compile if compile is None else compile)
        runtime_asked = choice.checked_runtime(runtime or options.runtime, "encoder")
        precision_asked = (precision or options.precision).lower()
        encoder = self.model.image_encoder
        self.precision = resolve_precision(precision_asked, self.device, mixed_is_fast=choice.openvino_may_encode(
            runtime_asked, encoder, self.device, self.compiled, self.auto_export_encoder))
        self.fused = fuse_conv_bn(encoder) if fuse else 0
        self.channels_last = bool(options.channels_last if channels_last is None else channels_last)
        if self.channels_last:
            encoder.to(memory_format=torch.channels_last)
        candidates = choice.encoder_candidates(runtime_asked, self.device, self.precision, self.compiled,
                                               self.auto_export_encoder)
        self.runtime, runner = choice.build_encoder(candidates, runtime_asked, encoder, self.embedding_name,
                                                    self.input_size, self.precision, options.onnx_dir, self.name)
        if self.runtime == "torch" and self.precision == "mixed" and precision_asked == "auto":
            self.precision = "fp32"  # 'auto' chose mixed for OpenVINO, which failed; in PyTorch it is no faster
        self._encoder = runner or (torch.compile(encoder, dynamic=False) if self.compiled else None)
        self._split: Optional[tuple[torch.nn.Module, torch.nn.Module]] = None  # precision 'mixed' in PyTorch
        if self.runtime == "torch" and self.precision == "mixed":
            self._split = split_encoder(encoder)
            if self.compiled:
                self._split = tuple(torch.compile(part, dynamic=False) for part in self._split)
        self._decoder_runtime_asked = choice.checked_runtime(decoder_runtime or options.decoder_runtime, "decoder")
        self.decoder_runtime = choice.decoder_runtime(self._decoder_runtime_asked, self.device, self.precision)
        self._exported_decoders: dict = {}  # f"{runtime}-{precision}" -> runner, built at the first decode
        self._sparse_embedding: Optional[SparsePromptEmbedding] = None

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype PyTorch's autocast runs the encoder (for 'mixed': its rest) in; None for float32."""
        return {"fp32": None, "bf16": torch.bfloat16, "mixed": torch.bfloat16, "fp16": torch.float16}[self.precision]

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
        return choice.decoder_precision(self.decoder_runtime, self.precision)

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
        # closes a sequence without a box, as in SAM's predictor): in PyTorch these tiny operations waited
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
        (``decoder_runtime``). ``dense`` is None without a mask input."""
        pe = self._dense_pe()
        runner = self._exported_decoder(pe)
        if runner is not None:
            return runner(emb, sparse, dense)
        return self.model.mask_decoder.predict_masks(
            image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=self._no_mask_dense() if dense is None else dense)

    def _exported_decoder(self, pe: torch.Tensor):
        """The exported decoder of ``decoder_runtime`` (None for PyTorch), built at its first decode. One
        that 'auto' chose and that cannot be built leaves its fallback (runtime_choice.DECODER_FALLBACK)."""
        while self.decoder_runtime != "torch":
            key = f"{self.decoder_runtime}-{self.decoder_precision}"
            if key not in self._exported_decoders:
                build = choice.DECODER_RUNNERS[self.decoder_runtime]
                try:
                    self._exported_decoders[key] = build(self.model.mask_decoder, pe,
                                                         self.model.prompt_encoder.no_mask_embed.weight,
                                                         self.decoder_precision, self.options.decoder_threads)
                except Exception as exc:  # an automatically chosen fast path that fails leaves the next one
                    if self._decoder_runtime_asked != "auto":
                        raise
                    fallback = choice.decoder_fallback(self.decoder_runtime)
                    log.warning("the %s decoder could not be built (%s); %s runs it", self.decoder_runtime, exc,
                                fallback)
                    self.decoder_runtime = fallback
                    continue
            return self._exported_decoders[key]
        return None

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
