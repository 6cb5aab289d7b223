"""The image encoder taken apart or folded, sharing its weights: its float32 stem and bfloat16 rest
(precision 'mixed'), and BatchNorm folded into the convolutions before it."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserInputError


def encoder_structure(encoder: torch.nn.Module) -> Optional[str]:
    """'tinyvit' (LiteMedSAM, MobileSAM), 'vit' (SAM ViT-B/L/H) or None for an encoder of another structure."""
    if all(hasattr(encoder, a) for a in ("patch_embed", "layers", "neck")):
        return "tinyvit"
    if all(hasattr(encoder, a) for a in ("patch_embed", "blocks", "neck", "pos_embed")):
        return "vit"
    return None


class _EncoderPart(torch.nn.Module):
    """A part of a TinyViT or ViT image encoder, sharing its modules."""

    def __init__(self, encoder: torch.nn.Module, structure: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.tinyvit = structure == "tinyvit"


class _EncoderStem(_EncoderPart):
    """The first, full-resolution part of an image encoder, which precision 'mixed' keeps in float32:
    TinyViT's patch embedding and convolutional first stage (LiteMedSAM, MobileSAM), or ViT's patch and
    position embedding (SAM ViT-B/L/H). Its rounding in bfloat16 costs the most accuracy for the least
    time (docs/PERFORMANCE.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        if self.tinyvit:
            return e.layers[0](e.patch_embed(x))
        x = e.patch_embed(x)
        return x + e.pos_embed if e.pos_embed is not None else x


class _EncoderRest(_EncoderPart):
    """The image encoder after :class:`_EncoderStem` (stem then rest = the whole encoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        if self.tinyvit:
            for layer in e.layers[1:]:
                x = layer(x)
            b, _, c = x.shape
            return e.neck(x.view(b, 64, 64, c).permute(0, 3, 1, 2))  # TinyViT's own fixed 64x64 grid
        for block in e.blocks:
            x = block(x)
        return e.neck(x.permute(0, 3, 1, 2))


def split_encoder(encoder: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stem, rest) of a TinyViT or SAM ViT image encoder, sharing its weights; ``rest(stem(x))`` equals
    ``encoder(x)``. A UserInputError for an encoder of another structure."""
    structure = encoder_structure(encoder)
    if structure is None:
        raise UserInputError(f"Precision 'mixed' needs a TinyViT or ViT image encoder, not {type(encoder).__name__}; "
                             "use precision fp32 or bf16.")
    return _EncoderStem(encoder, structure), _EncoderRest(encoder, structure)


def fuse_conv_bn(module: torch.nn.Module) -> int:
    """Fold every eval-mode (Conv2d, BatchNorm2d) pair held as a two-module Sequential (TinyViT's
    ``Conv2d_BN``) into one Conv2d with a bias, in place. Returns the number of pairs folded."""
    n = 0
    for name, child in list(module.named_children()):
        parts = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
        if (len(parts) == 2 and isinstance(parts[0], torch.nn.Conv2d) and isinstance(parts[1], torch.nn.BatchNorm2d)
                and parts[1].track_running_stats and parts[1].running_var is not None):
            conv, bn = parts
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
            setattr(module, name, fused)
            n += 1
        else:
            n += fuse_conv_bn(child)
    return n
