"""The image encoder exported to ONNX and run outside PyTorch, on CPU, one slice per run: by ONNX Runtime
(float32) or OpenVINO (float32, bfloat16 or 'mixed'). Each is called with (B, 3, S, S) float32 frames and
returns the (B, C, h, w) float32 embeddings as a torch tensor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from .encoder_parts import split_encoder
from .onnx_export import export_encoder_onnx, weights_digest
from .openvino_requests import Float32Rerun, openvino_request


class OnnxEncoder:
    """The exported image encoder run by ONNX Runtime on CPU in float32, one slice per run."""

    slices_per_run = 1  # a batch costs what its slices cost one by one

    def __init__(self, encoder: torch.nn.Module, name: str, input_size: int, precision: str,
                 onnx_dir: str | os.PathLike) -> None:
        if precision != "fp32":
            raise UserInputError(f"The onnxruntime encoder runs in fp32, not '{precision}'.")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UserInputError("The onnxruntime encoder needs the onnxruntime and onnx packages: "
                                 "pip install onnxruntime onnx, or use the torch runtime.") from exc
        self.path = export_encoder_onnx(encoder, name, input_size, onnx_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(np.concatenate([self.session.run(None, {"x": x[i:i + 1]})[0]
                                                for i in range(len(x))]))


class OpenVinoEncoder:
    """The exported image encoder compiled by OpenVINO for the CPU, one slice per run, in float32,
    bfloat16 (OpenVINO's inference precision: bfloat16 matrix products where the CPU has them, float32
    elsewhere) or 'mixed' (the stem of :func:`split_encoder` in float32, the rest in bfloat16: two
    compiled models run one after the other). The compiled models are kept beside the ONNX files
    (OpenVINO's model cache), so only the first run on a machine pays for the compilation. A slice whose
    reduced-precision embedding is not finite (seen with random weights, never on the CHAOS volumes) is
    encoded again in float32."""

    slices_per_run = 1  # a batch costs what its slices cost one by one

    def __init__(self, encoder: torch.nn.Module, name: str, input_size: int, precision: str,
                 onnx_dir: str | os.PathLike) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise UserInputError("The openvino encoder needs the openvino and onnx packages: "
                                 "pip install openvino onnx, or use the torch runtime.") from exc
        self._core = ov.Core()
        self._cache_dir = str(Path(onnx_dir) / "openvino-cache")
        self.precision = precision
        if precision == "mixed":
            stem, rest = split_encoder(encoder)
            digest = weights_digest(encoder)
            self.path = export_encoder_onnx(encoder, name, input_size, onnx_dir, part="stem", module=stem,
                                            digest=digest)
            self.rest_path = export_encoder_onnx(
                encoder, name, input_size, onnx_dir, part="rest", module=rest, digest=digest,
                example=lambda: stem.cpu().eval()(torch.zeros(1, 3, input_size, input_size)))
            self.stages = [self._compile(self.path, "fp32"), self._compile(self.rest_path, "bf16")]
        else:
            self.path = self.rest_path = export_encoder_onnx(encoder, name, input_size, onnx_dir)
            self.stages = [self._compile(self.path, precision)]
        self._fp32 = Float32Rerun(lambda: self._compile(self.rest_path, "fp32"), f"{precision} encoder")

    @property
    def fallbacks(self) -> int:
        """Slices encoded again in float32."""
        return self._fp32.count

    def _compile(self, path: str | os.PathLike, precision: str):
        return openvino_request(self._core, str(path), precision, torch.get_num_threads(), cache_dir=self._cache_dir)

    def _one(self, x: np.ndarray) -> np.ndarray:
        for stage in self.stages[:-1]:  # x becomes the last stage's input (the float32 stem's output)
            x = stage.infer({0: x})[0].copy()
        y = self.stages[-1].infer({0: x})[0].copy()
        return y if self.precision == "fp32" else self._fp32.mend((y,), {0: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))]))
