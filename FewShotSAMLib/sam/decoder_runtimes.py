"""The mask decoder exported to ONNX in memory (sam/decoder_graph.py) and run on CPU by ONNX Runtime
(float32) or OpenVINO (float32 or bfloat16). Each is called with the (1, C, h, w) float32 CPU embedding,
the sparse prompt tokens and the dense prompt (None without a mask input) and returns (masks (1, M, h',
w'), iou (1, M)) as torch tensors."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..errors import UserInputError
from .decoder_graph import export_decoder_onnx
from .openvino_requests import Float32Rerun, openvino_request


class _ExportedDecoder:
    """Common part of the exported decoders. Two graphs: one with the "no mask" dense prompt built in
    (built with the runner), one taking a dense prompt (built at the first mask input). ``threads``: the
    runtime's own thread pool; None takes torch's thread count when a graph is built, so that a caller who
    keeps torch to one thread (small numpy/torch work between decodes) still decodes on every core."""

    def __init__(self, decoder: torch.nn.Module, pe: torch.Tensor, no_mask: torch.Tensor,
                 threads: Optional[int] = None) -> None:
        self._decoder, self._pe, self._no_mask = decoder, pe.detach().float().cpu(), no_mask.detach().float().cpu()
        self._threads = threads
        self._runs: dict = {False: self._build(False)}

    def _build(self, with_mask: bool) -> Callable[[dict], tuple]:
        """A function of a feed dict returning (masks, iou) as numpy arrays."""
        raise NotImplementedError

    def threads(self) -> int:
        return int(self._threads or torch.get_num_threads())

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

    def __init__(self, decoder: torch.nn.Module, pe: torch.Tensor, no_mask: torch.Tensor,
                 precision: str = "fp32", threads: Optional[int] = None) -> None:
        if precision != "fp32":
            raise UserInputError(f"The onnxruntime decoder runs in fp32, not '{precision}'.")
        super().__init__(decoder, pe, no_mask, threads)

    def _build(self, with_mask: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads()
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
                 precision: str = "bf16", threads: Optional[int] = None) -> None:
        import openvino as ov

        if precision not in ("fp32", "bf16"):
            raise UserInputError(f"The openvino decoder runs in fp32 or bf16, not '{precision}'.")
        self.precision = precision
        self._core = ov.Core()
        self._reruns: list[Float32Rerun] = []
        super().__init__(decoder, pe, no_mask, threads)

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
        run = _OpenVinoRun(openvino_request(self._core, model, self.precision, self.threads()),
                           Float32Rerun(lambda: openvino_request(self._core, model, "fp32", self.threads()),
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

    def __init__(self, request, rerun: Optional[Float32Rerun]) -> None:
        self.request, self.rerun = request, rerun

    def __call__(self, feed: dict) -> tuple:
        out = self.request.infer(feed, share_inputs=True)  # the arrays are read in place, not copied
        masks, iou = out[0], out[1]
        return (masks, iou) if self.rerun is None else self.rerun.mend((masks, iou), feed)
