"""FoB's training losses: L_total = L_rac + lambda1 * L_heat + lambda2 * L_coor + L_fore (paper Eq. 16-19).

Every term has a gradient path: the coordinate loss reaches SPR through the differentiable refinement
(offsets, softmax weights, GCN, graph), the refined heatmaps are Gaussians rendered differentiably at the
refined points. Two forms of L_heat: the paper's MSE on the coarse heatmaps and on Gaussians at the refined
points, or (default) the cross-entropy of each channel's softmax over the grid against the normalised
target Gaussian on the coarse heat logits, SPR then learning from L_coor alone. L_coor: the paper's squared
distance or (default) smooth-L1 in model-frame pixels (``COOR_LOSSES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from FewShotSAMLib.fob.model import FoBConfig, FoBOutput, gaussian_heatmaps, weighted_pool

from .episodes import Episode


@dataclass
class LossWeights:
    """Weights and temperature of the loss terms. Defaults: the measured recipe (docs/FOB.md); the paper's
    are lambda_heat 1e3 with heat_loss 'mse', lambda_coor 1e-4 with coor_loss 'mse' (``PAPER``)."""

    lambda_heat: float = 1.0
    lambda_coor: float = 0.05
    temperature: float = 0.1
    coor_loss: str = "smooth_l1"  # one of COOR_LOSSES
    heat_loss: str = "ce"  # 'mse' (paper) or 'ce': cross-entropy of each channel's softmax over the grid


#: the paper's loss weights (Eq. 19)
PAPER = dict(lambda_heat=1e3, lambda_coor=1e-4, coor_loss="mse", heat_loss="mse")


def _coor_mse(d: torch.Tensor) -> torch.Tensor:
    return (d ** 2).sum(-1).mean()


def _coor_l1(d: torch.Tensor) -> torch.Tensor:
    return d.abs().sum(-1).mean()


def _coor_smooth_l1(d: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(d, torch.zeros_like(d), beta=1.0, reduction="none").sum(-1).mean()


#: L_coor variants on the refined - ground-truth difference in model-frame pixels: the paper's squared
#: distance, or the (smooth) L1 distance whose gradient does not grow with the error.
COOR_LOSSES = {"mse": _coor_mse, "l1": _coor_l1, "smooth_l1": _coor_smooth_l1}


def region_aware_contrast(out: FoBOutput, band: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with anchor = support foreground prototype, positive = mean feature of the support mask's
    outermost band, negatives = the background prompt prototypes (positive kept in the denominator)."""
    h = out.support_feat.shape[-1]
    w = F.adaptive_avg_pool2d(band[:, None], h)  # (B, 1, h, w)
    pos = weighted_pool(out.support_feat, w)[:, 0]  # (B, d)
    anchor = F.normalize(out.fg_proto, dim=-1)
    cands = torch.cat([pos[:, None], out.support_protos], 1)  # (B, 1 + Np, d)
    logits = torch.einsum("bd,bnd->bn", anchor, F.normalize(cands, dim=-1)) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def fob_losses(out: FoBOutput, ep: Episode, cfg: FoBConfig, weights: LossWeights | None = None
               ) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted total ('total')."""
    wts = weights or LossWeights()
    h = out.heatmaps.shape[-1]
    target = gaussian_heatmaps(ep.query_points, h, cfg.frame_size, cfg.sigma)
    if wts.heat_loss == "ce":
        if out.heat_logits is None:
            raise ValueError("the cross-entropy heat loss needs heat logits (log_heat or no BCM)")
        # each channel a distribution over the grid; the target is the normalised Gaussian at the point
        tn = target.flatten(2) / target.flatten(2).sum(-1, keepdim=True).clamp_min(1e-12)
        l_heat = -(tn * F.log_softmax(out.heat_logits.flatten(2), -1)).sum(-1).mean()
    elif wts.heat_loss == "mse":
        l_heat = F.mse_loss(out.heatmaps, target) + F.mse_loss(out.refined_heatmaps, target)
    else:
        raise ValueError(f"heat loss '{wts.heat_loss}' is not 'mse' or 'ce'")
    l_coor = COOR_LOSSES[wts.coor_loss](out.refined - ep.query_points)
    qm = F.adaptive_avg_pool2d(ep.query_mask[:, None], h)[:, 0]
    l_fore = F.binary_cross_entropy_with_logits(out.corr_logits, qm)
    l_rac = region_aware_contrast(out, ep.support_band, wts.temperature)
    total = l_rac + wts.lambda_heat * l_heat + wts.lambda_coor * l_coor + l_fore
    return {"total": total, "rac": l_rac, "heat": l_heat, "coor": l_coor, "fore": l_fore}


def point_error(out: FoBOutput, ep: Episode) -> tuple[float, float]:
    """Mean distance (model-frame pixels) of coarse and refined points to the ground truth."""
    c = (out.coarse - ep.query_points).norm(dim=-1).mean().item()
    r = (out.refined - ep.query_points).norm(dim=-1).mean().item()
    return c, r
