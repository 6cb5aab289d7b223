"""FoB (Focus on Background) as a prompt generator: background points localised on the query by the FoB
network (``fob/``), foreground points spread where the query correlates with the support foreground, a
box from the predicted background ring for box-trained backends, and a calibrated presence score.

Inside a propagation (the engine knows the neighbouring slice's answer: mode ``propagate``, the default
there) FoB gives the neighbour's box, as box propagation does, and decides where the target ends: the
presence is FoB's correlation map averaged over the neighbour's answer (eroded), against the threshold
calibrated for these weights (``propagation.min_corr`` in the metadata, written by
``python tools/lab.py calibrate-fob-extent``). FoB's background and foreground points are not added
there: on the point-aware LiteMedSAM they cut the target (docs/FOB.md). Weights without that threshold
keep their own prompt mode inside a propagation too, their presence model ending the target.

Weights: ``FoBGenerator(sam=name)`` loads the shipped weights for that SAM model (package data,
``FewShotSAMLib/fob/weights/``: ``fob.pt`` for LiteMedSAM's embeddings, ``fob_vit_t.pt`` for MobileSAM's)
and checks them against the SHA-256 and SAM backend recorded in the ``.json`` beside them;
``FoBGenerator(weights=path)`` loads any weights written by ``python tools/lab.py train-fob`` (research
tooling of a source checkout; its ``.json`` beside it is checked when present).
Inference needs only the support (embedding + mask) and the query embedding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..fob import shipped_weights
from ..prompt_types import Prompts, QueryContext, Support
from ..sam.weights import sha256_of
from ..shape import mask_box
from .boxprop import BoxPropagation
from .features import spread_points

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = shipped_weights()  # the default SAM model's (package data: pip and the Slicer build)
MODES = ("points", "box", "box+bg", "box+points", "propagate")
PRESENCE_SLOPE = 0.01  # correlation units per logit of the propagation presence


class FoBGenerator:
    """FoB prompts: ``mode`` is one of points | box | box+bg | box+points | propagate, or None for
    ``propagate`` inside a propagation when the weights have a propagation threshold, and otherwise the
    mode recorded with the weights for the backend in use (box-trained backends get a box, others points).
    ``weights`` is a weights file, or None for the shipped weights of the SAM model named ``sam``.
    ``min_corr`` overrides the calibrated propagation threshold."""

    name = "fob"

    def __init__(self, weights: Optional[str | Path] = None, mode: Optional[str] = None, tau: float = 0.9,
                 n_fg: Optional[int] = None, verify: bool = True, min_corr: Optional[float] = None,
                 sam: Optional[str] = None) -> None:
        from ..fob.model import FoBConfig, FoBNet

        path = Path(weights) if weights else shipped_weights(sam)
        if not path.exists():
            hint = ("train it with `python tools/lab.py train-fob` (source checkout)" if weights
                    else "the installation is incomplete; reinstall or pass weights=PATH")
            raise UserInputError(f"The FoB weights '{path}' do not exist; {hint}.")
        meta_path = path.with_suffix(".json")
        self.meta: dict = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if weights is None and not self.meta:
            raise UserInputError(f"The metadata file {meta_path} of the shipped FoB weights is missing; reinstall.")
        if verify and self.meta.get("sha256"):
            digest = sha256_of(path)
            if digest != self.meta["sha256"]:
                raise UserInputError(f"The FoB weights '{path}' do not match the SHA-256 in {meta_path.name} "
                                     "(corrupted or replaced file); restore the file or retrain.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.cfg = FoBConfig.from_dict(state["config"])
            self.net = FoBNet(self.cfg)
            self.net.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise UserInputError(f"The file '{path}' is not a FoB weights file written by the train command.") from exc
        self.net.eval()
        self.calibration: dict = state.get("calibration") or self.meta.get("calibration") or {}
        self.backend_name = self.meta.get("sam_backend")
        if mode is not None and mode not in MODES:
            raise UserInputError(f"Unknown FoB prompt mode '{mode}'; choose one of {', '.join(MODES)}.")
        self.mode = mode
        self.tau = float(tau)
        self.n_fg = int(n_fg if n_fg is not None else self.cfg.n_fg)
        self.path = path
        calibrated = (self.meta.get("propagation") or {}).get("min_corr")
        self.min_corr: Optional[float] = float(min_corr) if min_corr is not None else (
            float(calibrated) if calibrated is not None else None)
        self._prototype: Optional[tuple[Support, torch.Tensor]] = None  # the last support's, reused per query

    # ---- checks ---------------------------------------------------------------------------------
    def _check(self, backend, query: torch.Tensor) -> None:
        if self.backend_name and getattr(backend, "embedding_name", backend.name) != self.backend_name:
            raise UserInputError(f"These FoB weights were trained on {self.backend_name} embeddings but the SAM "
                                 f"backend is {backend.name}; use --sam {self.backend_name} or FoB weights "
                                 f"trained for {backend.name}.")
        if query.shape[0] != self.cfg.in_channels or backend.input_size != self.cfg.frame_size:
            raise UserInputError(f"These FoB weights expect {self.cfg.in_channels}-channel embeddings of a "
                                 f"{self.cfg.frame_size}-pixel frame; the backend gives {query.shape[0]} channels "
                                 f"at {backend.input_size}; use matching weights.")

    def prompt_mode(self, backend, context: Optional[QueryContext] = None) -> str:
        """The prompt mode used with ``backend`` (``propagate`` when ``context`` has a neighbour's answer and
        the weights a propagation threshold)."""
        if self.mode:
            return self.mode
        if context is not None and context.neighbour_mask is not None and self.min_corr is not None:
            return "propagate"
        modes = self.meta.get("prompt_modes", {})
        for name in (backend.name, getattr(backend, "embedding_name", backend.name)):
            if name in modes:
                return modes[name]
        return "box" if getattr(backend, "prefers_box", False) else "points"

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, support: Support, query: torch.Tensor, valid: Optional[np.ndarray] = None) -> dict:
        """Raw FoB outputs for one query: bg points, correlation map (S, S), presence, heatmap peaks."""
        from ..fob.inference import presence_features, ring_points

        cfg = self.cfg
        smask = np.asarray(support.mask, bool)
        sp = ring_points(smask, cfg.n_bg, cfg.ring_inner, cfg.ring_outer, valid, cfg.ring_spacing)
        if len(sp) == 0:
            raise UserInputError("The support mask is empty: paint the target on the example slice.")
        out = self.net(support.embedding.detach().float().cpu()[None], torch.from_numpy(smask.astype(np.float32))[None],
                       torch.from_numpy(sp)[None], query.detach().float().cpu()[None])
        h = out.heatmaps.shape[-1]
        s_area = float(F.adaptive_avg_pool2d(torch.from_numpy(smask.astype(np.float32))[None, None], h).sum())
        feats = presence_features(out.corr[0], out.heatmaps[0], s_area)
        corr = F.interpolate(out.corr[None], size=(cfg.frame_size, cfg.frame_size), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        return {"bg": out.refined[0].numpy(), "coarse": out.coarse[0].numpy(), "corr": corr,
                "presence": self.presence(feats), "features": feats}

    @torch.no_grad()
    def correlation(self, support: Support, query: torch.Tensor) -> np.ndarray:
        """FoB's correlation map C (model frame, values in [0, 1]): how much each query pixel looks like
        the support's target. The support's prototype is kept for the next query of the same support."""
        if self._prototype is None or self._prototype[0] is not support:
            mask = torch.from_numpy(np.asarray(support.mask, np.float32))[None]
            self._prototype = (support, self.net.foreground_prototype(support.embedding.detach().float().cpu()[None], mask))
        fq = self.net.features(query.detach().float().cpu()[None])
        logits = self.net.correlation_logits(self._prototype[1], fq)
        size = self.cfg.frame_size
        return torch.sigmoid(F.interpolate(logits[None], size=(size, size), mode="bilinear",
                                           align_corners=False))[0, 0].numpy()

    def propagation_presence(self, support: Support, query: torch.Tensor, neighbour: np.ndarray) -> float:
        """Presence of the target on a query next to an answered slice: FoB's correlation averaged over the
        neighbour's answer eroded by 3 px (the whole answer when that is empty), as a probability that
        crosses 0.5 at the calibrated threshold; 1 when these weights have no calibration."""
        from scipy import ndimage

        if self.min_corr is None:
            return 1.0
        core = ndimage.binary_erosion(neighbour, iterations=max(1, round(3 * self.cfg.frame_size / 256)))
        region = core if core.any() else np.asarray(neighbour, bool)
        if not region.any():
            return 0.0
        c = float(self.correlation(support, query)[region].mean())
        return float(1.0 / (1.0 + np.exp(-(c - self.min_corr) / PRESENCE_SLOPE)))

    def presence(self, feats: np.ndarray) -> float:
        """Calibrated probability that the target is on the query slice (logistic model fitted at the end
        of training on pseudo-label episodes); without calibration, the maximum correlation."""
        cal = self.calibration.get("presence")
        if not cal:
            return float(np.clip(feats[0], 0, 1))
        z = (feats - np.asarray(cal["mean"])) / np.asarray(cal["std"])
        return float(1 / (1 + np.exp(-(float(np.dot(cal["coef"], z)) + cal["intercept"]))))

    def foreground_points(self, corr: np.ndarray, valid: Optional[np.ndarray]) -> np.ndarray:
        """Up to n_fg points spread over C > tau (greedy spread, not raster order); the argmax otherwise."""
        c = np.where(valid, corr, -1.0) if valid is not None else corr
        cand = c > self.tau
        if not cand.any():
            r, cc = np.unravel_index(int(np.argmax(c)), c.shape)
            return np.array([[r, cc]], np.float32)
        spacing = max(3.0, 0.5 * np.sqrt(cand.sum() / max(1, self.n_fg)))
        return spread_points(c, self.n_fg, spacing, cand)

    def ring_box(self, bg: np.ndarray, size: int, valid: Optional[np.ndarray]) -> np.ndarray:
        """Minimum enclosing rectangle of the background ring, shrunk by the calibrated margin."""
        m = float(self.calibration.get("box_margin", self.cfg.ring_outer))
        r0, c0 = bg.min(0) + m
        r1, c1 = bg.max(0) - m
        if r1 < r0:
            r0 = r1 = (r0 + r1) / 2
        if c1 < c0:
            c0 = c1 = (c0 + c1) / 2
        hi_r, hi_c = size - 1, size - 1
        extent = mask_box(valid) if valid is not None else None
        if extent is not None:
            hi_r, hi_c = extent[2:]
        return np.array([np.clip(r0, 0, hi_r), np.clip(c0, 0, hi_c), np.clip(r1, 0, hi_r), np.clip(c1, 0, hi_c)],
                        np.float32)

    def generate(self, support: Support, query: torch.Tensor, context: QueryContext, backend) -> Prompts:
        """FoB prompts for one query slice (model frame)."""
        self._check(backend, query)
        mode = self.prompt_mode(backend, context)
        if mode == "propagate":  # box propagation's prompts, FoB's presence
            prompts = BoxPropagation().generate(support, query, context, backend)
            if prompts.is_empty:
                return prompts
            neighbour = context.neighbour_mask if context.neighbour_mask is not None else support.mask
            return replace(prompts, presence=self.propagation_presence(support, query, neighbour))
        valid = context.valid if context is not None else None
        p = self.predict(support, query, valid)
        size = self.cfg.frame_size
        bg = np.clip(p["bg"], 0, size - 1).astype(np.float32)
        fg = self.foreground_points(p["corr"], valid)
        box = self.ring_box(bg, size, valid) if mode.startswith("box") else None
        if mode == "box":
            return Prompts(box=box, presence=p["presence"])
        if mode == "box+bg":
            return Prompts(bg_points=bg, box=box, presence=p["presence"])
        return Prompts(fg_points=fg, bg_points=bg, box=box, presence=p["presence"])
