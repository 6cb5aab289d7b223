"""FoB's training losses: L_total = L_rac + lambda1 * L_heat + lambda2 * L_coor + L_fore (paper Eq. 16-19).

Every term has a gradient path: the coordinate loss reaches SPR through the differentiable refinement
(offsets, softmax weights, GCN, graph), the refined heatmaps are Gaussians rendered differentiably at the
refined points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from FewShotSAMLib.fob.model import FoBConfig, FoBOutput, gaussian_heatmaps, weighted_pool

from .episodes import Episode


@dataclass
class LossWeights:
    """Weights and temperature of the loss terms (paper defaults)."""

    lambda_heat: float = 1e3
    lambda_coor: float = 1e-4
    temperature: float = 0.1


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
    l_heat = F.mse_loss(out.heatmaps, target) + F.mse_loss(out.refined_heatmaps, target)
    l_coor = ((out.refined - ep.query_points) ** 2).sum(-1).mean()
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
