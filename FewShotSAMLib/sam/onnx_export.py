"""The image encoder exported to ONNX once per machine, for the OpenVINO and ONNX Runtime encoders (the
mask decoder's graph is made in memory: sam/decoder_graph.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


def weights_digest(encoder: torch.nn.Module) -> str:
    """SHA-1 of a module's weights (names and values): what exported files are named after."""
    digest = hashlib.sha1()
    for key, value in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_encoder_onnx(encoder: torch.nn.Module, name: str, input_size: int, onnx_dir: str | os.PathLike, *,
                        part: str = "", module: Optional[torch.nn.Module] = None,
                        example: Optional[Callable[[], torch.Tensor]] = None,
                        digest: Optional[str] = None) -> Path:
    """The image encoder (or ``module``, its ``part``, fed ``example()``) exported once to ONNX at batch 1
    (file named after the encoder's weights' digest, kept in ``onnx_dir``, written atomically); returns its
    path. Batch 1 because encoders such as TinyViT read the batch size as a Python number, which a trace
    freezes. ``example`` is called only when the file has to be written."""
    digest = digest or weights_digest(encoder)
    path = Path(onnx_dir) / f"{name}-{input_size}-b1{'-' + part if part else ''}-{digest[:16]}.onnx"
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
