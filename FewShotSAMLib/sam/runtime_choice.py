"""Which runtime runs a backend's image encoder and which its mask decoder.

Tables: the runner of each exported runtime (``ENCODER_RUNNERS``, ``DECODER_RUNNERS``), the precisions an
exported encoder runs in (``ENCODER_PRECISIONS``), and the runtime that takes over when an automatically
chosen decoder cannot be built (``DECODER_FALLBACK``). What 'auto' means (measured in docs/PERFORMANCE.md)
is one small function each for the encoder and the decoder.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..errors import UserInputError
from ..options import RUNTIMES
from . import device as probes  # looked up at each call, so that tests can stand in for the machine
from .decoder_runtimes import OnnxDecoder, OpenVinoDecoder
from .encoder_parts import encoder_structure
from .encoder_runtimes import OnnxEncoder, OpenVinoEncoder

log = logging.getLogger(__name__)

# runtime -> runner(encoder, name, input_size, precision, onnx_dir); PyTorch needs none
ENCODER_RUNNERS = {"onnxruntime": OnnxEncoder, "openvino": OpenVinoEncoder}
ENCODER_PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "mixed")}  # on CPU, not compiled
# runtime -> runner(mask_decoder, dense_pe, no_mask_embedding, precision, threads); PyTorch needs none
DECODER_RUNNERS = {"onnxruntime": OnnxDecoder, "openvino": OpenVinoDecoder}
DECODER_FALLBACK = {"openvino": "onnxruntime", "onnxruntime": "torch"}
LABELS = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def checked_runtime(name: str, part: str) -> str:
    """``name`` in lower case when it is 'auto' or one of RUNTIMES; else a UserInputError for ``part``
    ('encoder' or 'decoder')."""
    name = (name or "auto").lower()
    if name not in ("auto",) + RUNTIMES:
        raise UserInputError(f"Unknown {part} runtime '{name}'; use auto, {', '.join(RUNTIMES)}.")
    return name


def available(runtime: str) -> bool:
    """True when ``runtime``'s package can be imported (PyTorch always)."""
    return runtime == "torch" or getattr(probes, f"{runtime}_available")()


# ---- the encoder ---------------------------------------------------------------------------------
def _fits(runtime: str, device: torch.device, precision: str, compiled: bool) -> bool:
    return device.type == "cpu" and precision in ENCODER_PRECISIONS[runtime] and not compiled


def openvino_may_encode(asked: str, encoder: torch.nn.Module, device: torch.device, compiled: bool,
                        auto_export: bool) -> bool:
    """True when OpenVINO is to run this encoder on CPU (asked for, or chosen by runtime 'auto' for a family
    whose encoder exports quickly), so that precision 'auto' may pick 'mixed' (in PyTorch 'mixed' is no
    faster than float32 on CPU)."""
    if device.type != "cpu" or compiled or asked not in ("auto", "openvino") or (asked == "auto" and not auto_export):
        return False
    return encoder_structure(encoder) is not None and probes.openvino_available()


def encoder_candidates(asked: str, device: torch.device, precision: str, compiled: bool,
                       auto_export: bool) -> list[str]:
    """The runtimes to try, in order. An exported runtime asked for by name must fit (CPU, one of its
    precisions, no torch.compile); 'auto' is OpenVINO on CPU for families whose encoder exports quickly
    (``auto_export``) when it is installed and fits, then PyTorch."""
    if asked == "auto":
        if auto_export and _fits("openvino", device, precision, compiled) and available("openvino"):
            return ["openvino", "torch"]
        return ["torch"]
    if asked != "torch" and not _fits(asked, device, precision, compiled):
        allowed = ENCODER_PRECISIONS[asked]
        words = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        choose = f"precision {allowed[0]}" if len(allowed) == 1 else "one of those precisions"
        raise UserInputError(f"The {asked} encoder runs on CPU in {words} without torch.compile; "
                             f"choose device cpu and {choose}, or the torch runtime.")
    return [asked]


def build_encoder(candidates: list[str], asked: str, encoder: torch.nn.Module, name: str, input_size: int,
                  precision: str, onnx_dir: str | os.PathLike, label: str) -> tuple[str, Optional[object]]:
    """(runtime, runner) of the first candidate that builds (runner None for PyTorch). When 'auto' chose
    an exported runtime, any failure to build it leaves the next candidate (``label`` names the model in
    the warning); a runtime asked for by name raises its error."""
    for runtime in candidates:
        if runtime == "torch":
            return runtime, None
        try:
            return runtime, ENCODER_RUNNERS[runtime](encoder, name, input_size, precision, onnx_dir)
        except Exception as exc:  # any failure of the optional fast path leaves the plain one
            if asked != "auto":
                raise
            log.warning("%s could not take the %s encoder (%s); PyTorch runs it", LABELS[runtime], label, exc)
    return "torch", None


# ---- the decoder ---------------------------------------------------------------------------------
def decoder_runtime(asked: str, device: torch.device, encoder_precision: str) -> str:
    """The runtime of the mask decoder. 'auto': PyTorch off the CPU; on CPU OpenVINO beside an encoder in
    reduced precision on a CPU with native bfloat16, else ONNX Runtime, else PyTorch. A runtime asked for
    by name must be installed and on CPU."""
    if asked == "auto":
        if device.type != "cpu":
            return "torch"
        if encoder_precision in ("bf16", "mixed") and probes.cpu_has_fast_bf16() and available("openvino"):
            return "openvino"
        return "onnxruntime" if available("onnxruntime") else "torch"
    if asked != "torch":
        if device.type != "cpu":
            raise UserInputError(f"The {asked} decoder runs on CPU; choose device cpu or the torch decoder.")
        if not available(asked):
            raise UserInputError(f"The {asked} decoder needs the {asked} and onnx packages: "
                                 f"pip install {asked} onnx, or use the torch decoder.")
    return asked


def decoder_precision(runtime: str, encoder_precision: str) -> str:
    """'bf16' for the OpenVINO decoder beside a reduced-precision encoder, else 'fp32' (the PyTorch
    decoder is never autocast)."""
    return "bf16" if runtime == "openvino" and encoder_precision in ("bf16", "mixed") else "fp32"


def decoder_fallback(runtime: str) -> str:
    """The installed runtime that decodes when ``runtime``, chosen by 'auto', cannot be built."""
    runtime = DECODER_FALLBACK[runtime]
    while not available(runtime):
        runtime = DECODER_FALLBACK[runtime]
    return runtime
