"""Where and in what arithmetic the encoder runs: the device, the precision, and what this machine offers
(native bfloat16 instructions, the ONNX Runtime and OpenVINO packages)."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..errors import UserInputError
from ..options import PRECISIONS


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


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix instructions (AVX-512 BF16 or AMX) for oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onnxruntime_available() -> bool:
    """True when the onnxruntime package can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True when the openvino package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def resolve_precision(precision: Optional[str], device: torch.device, mixed_is_fast: bool = False) -> str:
    """The encoder's arithmetic: 'fp32' (plain), 'bf16' (CPU or CUDA autocast), 'mixed' (the encoder's
    stem in float32, the rest in bfloat16, see ``encoder_parts.split_encoder``) or 'fp16' (CUDA autocast).

    ``None`` or 'auto': 'fp16' on CUDA; on CPU 'mixed' when the CPU has native bfloat16 and
    ``mixed_is_fast`` (the caller runs the encoder in OpenVINO, where 'mixed' is about 1.4x faster than
    float32 at the same accuracy, docs/PERFORMANCE.md), else 'fp32'.
    """
    name = (precision or "auto").lower()
    if name == "auto":
        name = "fp16" if device.type == "cuda" else ("mixed" if mixed_is_fast and cpu_has_fast_bf16() else "fp32")
    if name not in PRECISIONS:
        raise UserInputError(f"Unknown precision '{precision}'; use fp32, bf16, mixed, fp16 or auto.")
    if name == "fp16" and device.type != "cuda":
        raise UserInputError("float16 encoding is for CUDA GPUs; on CPU use precision mixed, bf16 or fp32.")
    return name
