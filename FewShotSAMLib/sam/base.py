"""The SamBackend interface: encode a model-frame slice once, decode any number of prompt sets against it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..prompts.base import Prompts

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
    """

    name: str = "sam"
    input_size: int = 1024
    prefers_box: bool = False  # trained with boxes: feed it a box whenever there is one
    batch_size: int = 4

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.autocast_dtype: Optional[torch.dtype] = torch.float16 if self.device.type == "cuda" else None

    # ---- encoding -------------------------------------------------------------------------------
    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, S, S) in [0, 1] -> (B, 3, S, S) as the encoder expects. Subclasses override."""
        return frames[:, None].expand(-1, 3, -1, -1)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Encode (B, S, S) model-frame slices in [0, 1]; returns (B, C, h, w) float32 on self.device."""
        x = torch.as_tensor(np.asarray(frames, dtype=np.float32) if not torch.is_tensor(frames) else frames)
        if x.ndim == 2:
            x = x[None]
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"frames must be {self.input_size}x{self.input_size}, got {tuple(x.shape)}")
        x = self._normalise(x.to(self.device, torch.float32))
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                emb = self.model.image_encoder(x)
        else:
            emb = self.model.image_encoder(x)
        return emb.float()

    # ---- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, prompts: Prompts, multimask: bool = False) -> DecodeResult:
        """Decode one prompt set against one (C, h, w) embedding."""
        emb = embedding.to(self.device, torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        coords, labels = [], []
        for pts, lab in ((prompts.fg_points, 1), (prompts.bg_points, 0)):
            if len(pts):
                coords.append(torch.as_tensor(pts[:, ::-1].copy(), dtype=torch.float32))  # (row,col)->(x,y)
                labels.append(torch.full((len(pts),), lab, dtype=torch.int64))
        points = None
        if coords:
            pc = torch.cat(coords)[None].to(self.device)
            pl = torch.cat(labels)[None].to(self.device)
            if prompts.box is None:
                # SAM's convention: without a box, a padding point closes the sequence.
                pc = torch.cat([pc, torch.zeros(1, 1, 2, device=self.device)], 1)
                pl = torch.cat([pl, -torch.ones(1, 1, dtype=torch.int64, device=self.device)], 1)
            points = (pc, pl)
        boxes = None
        if prompts.box is not None:
            r0, c0, r1, c1 = [float(v) for v in prompts.box]
            boxes = torch.tensor([[c0, r0, c1, r1]], dtype=torch.float32, device=self.device)
        masks = None
        if prompts.mask_input is not None:
            masks = torch.as_tensor(prompts.mask_input, dtype=torch.float32, device=self.device)[None, None]
        if points is None and boxes is None and masks is None:
            raise ValueError("decode needs at least one point, a box or a mask input")
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low, iou = self.model.mask_decoder(
            image_embeddings=emb,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        if multimask:
            best = int(torch.argmax(iou[0]))
            low, iou = low[:, best : best + 1], iou[:, best : best + 1]
        logits = F.interpolate(low, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return DecodeResult(
            logits=logits[0, 0].float().cpu().numpy(),
            score=float(iou[0, 0]),
            low_res=low[0, 0].float().cpu().numpy(),
        )
