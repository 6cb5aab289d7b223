"""The FoB network (Focus on Background, Ji et al.) on top of frozen SAM image embeddings.

Modules: a small trainable adapter on the frozen SAM embedding, BPPC (ring points -> Gaussian heatmaps ->
prompt prototypes), BCM (foreground correlation, foreground suppression, prompt proposals, one masked-
attention transformer layer, detection head) and SPR (adaptive + ring graph GCN, iterative deformable
refinement). Coordinates are (row, col) floats in the model frame of ``frame_size`` pixels (256 for
LiteMedSAM) with pixel centres at integers; feature maps have ``grid`` cells per side (64 for LiteMedSAM).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FoBConfig:
    """Hyper-parameters of the network (stored with the weights)."""

    in_channels: int = 256  # SAM embedding channels
    dim: int = 64  # adapter / token width
    n_bg: int = 10  # Np, background prompts
    n_fg: int = 10  # Nf, foreground prompts (inference only)
    frame_size: int = 256  # model frame (pixels)
    grid: int = 64  # embedding grid (cells)
    token_grid: int = 32  # transformer tokens per side (32 or 64)
    heads: int = 4
    sigma: float = 4.0  # heatmap sigma, model-frame pixels
    ring_inner: int = 6  # chessboard distances (pixels) bounding the ring: square kernels 13 and 15 (paper)
    ring_outer: int = 7
    k_offsets: int = 8
    iterations: int = 3  # kappa
    use_bcm: bool = True  # ablation switches
    use_spr: bool = True
    use_ring_graph: bool = True
    ring_spacing: str = "angle"  # ring point i: on the ray at angle i ('angle') or by ring-pixel count ('pixels')
    spatial_prior: bool = True  # matching prior windowed by a Gaussian (learnable width) at the support point
    prior_sigma: float = 24.0  # initial width of that window, model-frame pixels
    prior_t: float = 0.05  # initial temperature of the matching prior (learnable)
    spr_context: bool = True  # SPR's offsets also see the prototype, C around the point and the support point
    log_heat: bool = True  # head residual added to the prior's logits (heatmap = exp(logits - max)), not to the prior

    #: values of the fields above for weights saved before they existed (their behaviour then)
    LEGACY = {"ring_spacing": "pixels", "spatial_prior": False, "spr_context": False, "log_heat": False}

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FoBConfig":
        """Inverse of :meth:`to_dict`, ignoring unknown keys; a missing newer field takes its legacy value."""
        d = {**cls.LEGACY, **d}
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------
# Geometry helpers (model frame <-> feature grid)
# ------------------------------------------------------------------------------------------------
def to_grid_normalised(points: torch.Tensor, frame_size: int) -> torch.Tensor:
    """(..., 2) model-frame (row, col) -> grid_sample's (x, y) in [-1, 1] (align_corners=False).

    A model-frame pixel centre r lies at (r + 0.5) / S of the image extent, whatever the feature grid.
    """
    norm = (points + 0.5) / frame_size * 2.0 - 1.0
    return norm.flip(-1)


def bilinear_sample(features: torch.Tensor, points: torch.Tensor, frame_size: int) -> torch.Tensor:
    """Features (B, C, h, w) sampled at model-frame points (B, N, 2) -> (B, N, C)."""
    grid = to_grid_normalised(points, frame_size)[:, :, None, :]  # (B, N, 1, 2)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def cell_centres(grid: int, frame_size: int, like: torch.Tensor) -> torch.Tensor:
    """(grid,) model-frame coordinate of each grid cell's centre (dtype and device of ``like``)."""
    return (torch.arange(grid, dtype=like.dtype, device=like.device) + 0.5) * (frame_size / grid) - 0.5


def centre_of_mass(weights: torch.Tensor, centres: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., h, w) non-negative weights -> (..., 2) weighted mean (row, col) of the coordinates ``centres``
    (h,) = (w,); ``eps`` bounds the total weight from below."""
    tot = weights.sum((-2, -1)).clamp_min(eps)
    return torch.stack([(weights.sum(-1) * centres).sum(-1) / tot, (weights.sum(-2) * centres).sum(-1) / tot], -1)


def gaussian_heatmaps(points: torch.Tensor, grid: int, frame_size: int, sigma: float) -> torch.Tensor:
    """(B, N, 2) model-frame points -> (B, N, grid, grid) Gaussians (peak 1) sampled at grid-cell
    centres; differentiable in the points."""
    centres = cell_centres(grid, frame_size, points)
    gr = torch.exp(-(centres - points[..., 0, None]) ** 2 / (2.0 * sigma ** 2))  # (B, N, grid) separable
    gc = torch.exp(-(centres - points[..., 1, None]) ** 2 / (2.0 * sigma ** 2))
    return gr[..., :, None] * gc[..., None, :]


def weighted_pool(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average pooling: features (B, C, h, w), weights (B, N, h, w) -> (B, N, C)."""
    num = torch.einsum("bchw,bnhw->bnc", features, weights)
    den = weights.sum((-2, -1))[..., None].clamp_min(1e-6)
    return num / den


def grid_argmax(heatmaps: torch.Tensor, frame_size: int) -> torch.Tensor:
    """(B, N, h, w) -> (B, N, 2) model-frame (row, col) of each channel's maximum (cell centre)."""
    b, n, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, n, -1).argmax(-1)
    rows = (flat // w).float()
    cols = (flat % w).float()
    scale = frame_size / h
    return torch.stack([(rows + 0.5) * scale - 0.5, (cols + 0.5) * scale - 0.5], -1)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """Frozen SAM embedding -> task features: 1x1 projection, depthwise 3x3, 1x1, residual, GroupNorm."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, 1)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.norm = nn.GroupNorm(8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, h, w) -> (B, dim, h, w)."""
        y = self.proj(x)
        return self.norm(y + self.pw(F.gelu(self.dw(F.gelu(y)))))


class MaskedAttentionLayer(nn.Module):
    """One transformer layer whose attention logits get an additive per-key bias (Eq. 6-7)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, d), key_bias (B, L) -> (B, L, d)."""
        b, l, d = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = key_bias[:, None, None, :].to(q.dtype)  # broadcast over heads and queries
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        att = att.transpose(1, 2).reshape(b, l, d)
        x = self.ln1(self.out(att) + tokens)
        return self.ln2(self.ffn(x) + x)


def _peak_one(logits: torch.Tensor) -> torch.Tensor:
    """exp(logits - per-channel max): heatmaps with peak 1."""
    return torch.exp(logits - logits.flatten(2).max(-1).values[..., None, None])


#: the 3 x 3 stencil (row, col) on which SPR's context samples C
STENCIL = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]


#: geometric inputs of SPR's offsets with ``spr_context``: the C stencil and four relative positions
N_GEO = len(STENCIL) + 8


class SPR(nn.Module):
    """Structure-guided prompt refinement: support graph -> GCN on query prototypes -> deformable
    refinement of the coarse coordinates (Eq. 8-15)."""

    def __init__(self, cfg: FoBConfig) -> None:
        super().__init__()
        d, n = cfg.dim, cfg.n_bg
        self.cfg = cfg
        self.w_theta = nn.Linear(d, d, bias=False)
        self.w_phi = nn.Linear(d, d, bias=False)
        self.alpha_logit = nn.Parameter(torch.zeros(()))
        self.w_g = nn.Linear(d, d, bias=False)
        # context (spr_context): the point's support prototype and N_GEO geometric inputs (``context``)
        n_in = 3 * d + N_GEO if cfg.spr_context else 2 * d
        self.offsets = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, 2 * cfg.k_offsets))
        if cfg.spr_context:
            # a direct linear path from the N_GEO geometric inputs to the offsets: through the MLP alone
            # they are 17 of ~210 inputs and drown in the feature channels (SPR then learnt no move at all)
            self.geo = nn.Linear(N_GEO, 2 * cfg.k_offsets)
            nn.init.zeros_(self.geo.weight)
            nn.init.zeros_(self.geo.bias)
        self.w_att = nn.Linear(d, cfg.k_offsets, bias=False)
        ring = torch.zeros(n, n)
        for i in range(n):
            ring[i, (i + 1) % n] = 1.0
            ring[i, (i - 1) % n] = 1.0
        self.register_buffer("ring", ring, persistent=False)
        nn.init.normal_(self.offsets[-1].weight, std=1e-3)
        nn.init.zeros_(self.offsets[-1].bias)

    @property
    def alpha(self) -> torch.Tensor:
        """Mixing weight of the adaptive graph, in [0, 1]."""
        return torch.sigmoid(self.alpha_logit)

    def graph(self, support_protos: torch.Tensor) -> torch.Tensor:
        """(B, Np, d) support prompt prototypes -> (B, Np, Np) structure A."""
        d = support_protos.shape[-1]
        a_ada = torch.softmax(self.w_theta(support_protos) @ self.w_phi(support_protos).transpose(1, 2)
                              / math.sqrt(d), -1)
        if not self.cfg.use_ring_graph:
            return a_ada
        return self.alpha * a_ada + (1 - self.alpha) * self.ring[None]

    def context(self, support_protos: torch.Tensor, corr: torch.Tensor, support_points: torch.Tensor,
                mu: torch.Tensor, centre_of_mass: torch.Tensor, support_centroid: torch.Tensor) -> torch.Tensor:
        """(B, Np, d + N_GEO) what the offsets see besides the query features (``spr_context``): the support
        prototype, then C on a 3 x 3 stencil of +-2 grid cells around the current point and four candidate
        positions relative to it (in 8-cell units): the support point; the centre of mass of the point's
        coarse heatmap near it; the support ring translated to the query ring's estimated centre (the mean
        of the current points plus the support's centroid-to-ring-mean offset); and the current point
        projected onto its ray from that centre (direction of the support point from the support centroid),
        which removes the error along the ring."""
        cfg = self.cfg
        cell = cfg.frame_size / corr.shape[-1]
        b, n, _ = mu.shape
        st = torch.tensor(STENCIL, dtype=mu.dtype, device=mu.device) * 2 * cell  # (9, 2)
        pts = (mu[:, :, None, :] + st).reshape(b, n * len(STENCIL), 2)
        c = bilinear_sample(corr[:, None], pts, cfg.frame_size).reshape(b, n, len(STENCIL))
        centre = mu.mean(1, keepdim=True) + support_centroid[:, None] - support_points.mean(1, keepdim=True)
        spoke = support_points - support_centroid[:, None]  # (B, Np, 2)
        translated = centre + spoke
        u = spoke / spoke.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        projected = centre + ((mu - centre) * u).sum(-1, keepdim=True).clamp_min(0) * u
        rel = [(x - mu) / (8 * cell) for x in (support_points, centre_of_mass, translated, projected)]
        return torch.cat([support_protos, c] + rel, -1)

    def forward(self, support_protos: torch.Tensor, query_feat: torch.Tensor, coarse: torch.Tensor,
                corr: Optional[torch.Tensor] = None, support_points: Optional[torch.Tensor] = None,
                heatmaps: Optional[torch.Tensor] = None, support_centroid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine coarse points (B, Np, 2) -> (refined points (B, Np, 2), updated prototypes Q').
        ``corr`` (B, h, w) in [0, 1], ``support_points`` (B, Np, 2), the coarse ``heatmaps`` (B, Np, h, w,
        peak 1, not differentiated) and the support mask's ``support_centroid`` (B, 2) are needed with
        ``spr_context``; the offsets are then in grid cells (frame_size / grid pixels), else in pixels
        (paper)."""
        cfg = self.cfg
        heat = gaussian_heatmaps(coarse, query_feat.shape[-1], cfg.frame_size, cfg.sigma)
        q = weighted_pool(query_feat, heat)  # (B, Np, d)
        a = self.graph(support_protos)
        deg = a.sum(-1).clamp_min(1e-6)
        dinv = deg.rsqrt()
        a_norm = dinv[..., :, None] * a * dinv[..., None, :]
        q2 = F.relu(a_norm @ self.w_g(q))  # (B, Np, d)
        w = torch.softmax(self.w_att(q2), -1)  # (B, Np, k)
        mu = coarse
        f = q2
        b, n, _ = mu.shape
        unit = cfg.frame_size / query_feat.shape[-1] if cfg.spr_context else 1.0
        if cfg.spr_context:  # the heatmap's centre of mass within 2 cells (sigma) of the coarse point
            wgt = heatmaps.detach() * gaussian_heatmaps(coarse, query_feat.shape[-1], cfg.frame_size, 2 * unit)
            com = centre_of_mass(wgt, cell_centres(query_feat.shape[-1], cfg.frame_size, coarse), 1e-12)
        for _ in range(cfg.iterations):
            if cfg.spr_context:
                ctx = self.context(support_protos, corr, support_points, mu, com, support_centroid)
                geo = ctx[..., support_protos.shape[-1]:]
                off = self.offsets(torch.cat([q2, f, ctx], -1)) + 8 * self.geo(geo)  # geo: 8-cell units in and out
            else:
                off = self.offsets(torch.cat([q2, f], -1))
            off = unit * off.reshape(b, n, cfg.k_offsets, 2)
            cand = mu[:, :, None, :] + off  # (B, Np, k, 2)
            mu = (w[..., None] * cand).sum(2)
            sampled = bilinear_sample(query_feat, cand.reshape(b, n * cfg.k_offsets, 2), cfg.frame_size)
            f = (w[..., None] * sampled.reshape(b, n, cfg.k_offsets, -1)).sum(2)
        return mu, q2


@dataclass
class FoBOutput:
    """What the network predicts for one batch of episodes."""

    corr_logits: torch.Tensor  # (B, h, w) foreground logits; C = sigmoid
    heatmaps: torch.Tensor  # (B, Np, h, w) coarse heatmaps
    coarse: torch.Tensor  # (B, Np, 2) argmax points (no gradient)
    refined: torch.Tensor  # (B, Np, 2)
    refined_heatmaps: torch.Tensor  # (B, Np, h, w) Gaussians at the refined points
    support_protos: torch.Tensor  # (B, Np, d)
    fg_proto: torch.Tensor  # (B, d)
    support_feat: torch.Tensor  # (B, d, h, w)
    query_feat: torch.Tensor  # (B, d, h, w)
    heat_logits: Optional[torch.Tensor] = None  # (B, Np, h, w) log heatmaps (log_heat or no BCM), else None

    @property
    def corr(self) -> torch.Tensor:
        """Correlation map C in [0, 1]."""
        return torch.sigmoid(self.corr_logits)


class FoBNet(nn.Module):
    """FoB: (support embedding, support mask, support ring points, query embedding) -> prompts."""

    def __init__(self, cfg: Optional[FoBConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FoBConfig()
        d, n = cfg.dim, cfg.n_bg
        self.adapter = Adapter(cfg.in_channels, d)
        # C = sigmoid(scale * (cos - shift)): a calibrated correlation map usable by a cross-entropy loss.
        self.corr_scale = nn.Parameter(torch.tensor(10.0))
        self.corr_shift = nn.Parameter(torch.tensor(0.5))
        self.w_p = nn.Linear(d, d, bias=False)
        self.w_q = nn.Conv2d(d, d, 1, bias=False)
        self.chan_att = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.Sigmoid())
        self.bias_conv = nn.Conv2d(n, 1, 1)
        self.pos = nn.Parameter(torch.zeros(1, cfg.token_grid * cfg.token_grid, d))
        nn.init.normal_(self.pos, std=0.02)
        self.transformer = MaskedAttentionLayer(d, cfg.heads)
        self.head = nn.Sequential(nn.Conv2d(d + n, d, 1), nn.ReLU(), nn.Conv2d(d, d, 3, padding=1, groups=d),
                                  nn.ReLU(), nn.Conv2d(d, n, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        # Matching prior: exp((cos(p_i, F_q) - max) / t) peaks at 1 at each prototype's best match (with
        # spatial_prior within a Gaussian window at the support point); the head learns a residual on it, on
        # its logits with log_heat (a short CPU training cannot learn heatmaps from zero).
        self.prior_log_t = nn.Parameter(torch.tensor(math.log(cfg.prior_t)))
        if cfg.spatial_prior:  # width of the window around each support point, learnable
            self.prior_log_sigma = nn.Parameter(torch.tensor(math.log(cfg.prior_sigma)))
        self.spr = SPR(cfg)

    def prior_logits(self, protos: torch.Tensor, fq: torch.Tensor, support_points: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """(B, Np, h, w) log of the matching prior (up to a constant): cos / t, with ``spatial_prior`` minus
        the squared distance to the prototype's support point over 2 sigma^2."""
        cos = torch.einsum("bnd,bdhw->bnhw", F.normalize(protos, dim=-1), F.normalize(fq, dim=1))
        logit = cos / self.prior_log_t.exp()
        if self.cfg.spatial_prior and support_points is not None:
            centres = cell_centres(fq.shape[-1], self.cfg.frame_size, fq)
            d2 = ((centres - support_points[..., 0, None]) ** 2)[..., :, None] + \
                 ((centres - support_points[..., 1, None]) ** 2)[..., None, :]
            logit = logit - d2 / (2.0 * self.prior_log_sigma.exp() ** 2)
        return logit

    def matching_prior(self, protos: torch.Tensor, fq: torch.Tensor, support_points: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """(B, Np, h, w) sharpened cosine match of each prompt prototype against the query features, peak 1;
        with ``spatial_prior`` times a Gaussian window at the prototype's support point (the query's target
        lies near the support's: adjacent slices, or the same anatomy in another volume)."""
        return _peak_one(self.prior_logits(protos, fq, support_points))

    def features(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, Cin, h, w) SAM embedding -> (B, d, h, w) adapted features."""
        return self.adapter(embedding)

    def foreground_prototype(self, support_emb: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) mean adapted support feature under the support mask (B, S, S)."""
        fs = self.features(support_emb)
        m = F.adaptive_avg_pool2d(support_mask.float()[:, None], fs.shape[-1])
        return weighted_pool(fs, m)[:, 0]

    def correlation_logits(self, fg_proto: torch.Tensor, query_feat: torch.Tensor) -> torch.Tensor:
        """(B, h, w) logits of the correlation map C: how much each query cell looks like the support
        foreground (``fg_proto`` (B, d) against adapted query features (B, d, h, w))."""
        cos = F.cosine_similarity(query_feat, fg_proto[:, :, None, None], dim=1)
        return self.corr_scale * (cos - self.corr_shift)

    def forward(self, support_emb: torch.Tensor, support_mask: torch.Tensor, support_points: torch.Tensor,
                query_emb: torch.Tensor) -> FoBOutput:
        """support_emb/query_emb (B, Cin, h, w); support_mask (B, S, S) float/bool in the model frame;
        support_points (B, Np, 2) model-frame ring points (see :func:`..fob.inference.ring_points`)."""
        cfg = self.cfg
        fs = self.features(support_emb)
        fq = self.features(query_emb)
        h = fs.shape[-1]
        m = F.adaptive_avg_pool2d(support_mask.float()[:, None], h)[:, 0]  # (B, h, w) area fractions
        fg_proto = weighted_pool(fs, m[:, None])[:, 0]  # (B, d)
        g = gaussian_heatmaps(support_points, h, cfg.frame_size, cfg.sigma)
        protos = weighted_pool(fs, g)  # (B, Np, d)  BPPC

        corr_logits = self.correlation_logits(fg_proto, fq)
        if cfg.use_bcm:
            c = torch.sigmoid(corr_logits)
            fsup = (1 - c)[:, None] * fq
            att = self.chan_att(protos)  # (B, Np, d) channel attention conditioned on the prototypes
            pp = att * self.w_p(protos)
            phi = torch.einsum("bnd,bdhw->bnhw", pp, self.w_q(fsup)) / math.sqrt(cfg.dim)
            tg = cfg.token_grid
            phi_t = F.adaptive_avg_pool2d(phi, tg) if tg != h else phi
            fs_t = F.adaptive_avg_pool2d(fsup, tg) if tg != h else fsup
            bias = F.relu(self.bias_conv(phi_t))[:, 0].flatten(1)  # (B, L)
            tokens = fs_t.flatten(2).transpose(1, 2) + self.pos
            mod = self.transformer(tokens, bias).transpose(1, 2).reshape(-1, cfg.dim, tg, tg)
            if tg != h:
                mod = F.interpolate(mod, size=(h, h), mode="bilinear", align_corners=False)
            residual = self.head(torch.cat([mod + fsup, phi], 1))
            if cfg.log_heat:
                heat_logits = self.prior_logits(protos, fq, support_points) + residual
                heat = _peak_one(heat_logits)
            else:
                heat_logits = None
                heat = self.matching_prior(protos, fq, support_points) + residual
        else:  # ablation: plain prototype matching (cosine of prompt prototypes against query features)
            heat_logits = self.prior_logits(protos, fq, support_points)
            heat = _peak_one(heat_logits)
        coarse = grid_argmax(heat.detach(), cfg.frame_size)
        if cfg.use_spr:
            sm = support_mask.float()
            centroid = centre_of_mass(sm, torch.arange(sm.shape[-1], dtype=sm.dtype, device=sm.device), 1e-6)
            refined, _ = self.spr(protos, fq, coarse, torch.sigmoid(corr_logits), support_points, heat, centroid)
        else:
            refined = coarse + 0.0 * heat.sum()  # keeps the graph connected for a uniform loss
        refined_heat = gaussian_heatmaps(refined, h, cfg.frame_size, cfg.sigma)
        return FoBOutput(corr_logits, heat, coarse, refined, refined_heat, protos, fg_proto, fs, fq, heat_logits)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
