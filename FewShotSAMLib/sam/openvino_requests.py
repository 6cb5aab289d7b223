"""What the OpenVINO encoder and decoder share: a model compiled for the CPU, and the float32 request that
answers again where a reduced-precision one gave non-finite values."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)


def openvino_request(core, model, precision: str, threads: int, cache_dir: Optional[str] = None):
    """An inference request of ``model`` (a path or an OpenVINO model) compiled for the CPU with the latency
    hint, ``threads`` threads and inference precision 'fp32' or 'bf16' (kept in ``cache_dir`` if given)."""
    config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if cache_dir:
        config["CACHE_DIR"] = cache_dir
    return core.compile_model(model, "CPU", config).create_infer_request()


class Float32Rerun:
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
