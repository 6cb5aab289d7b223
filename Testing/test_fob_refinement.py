"""FoB's second recipe: angle-spaced ring points, the spatial window on the matching prior, SPR with context
that learns to move the coarse points, the loss options and the held-back evaluation of the training."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from FewShotSAMLib.fob.inference import ring_points
from FewShotSAMLib.fob.model import FoBConfig, FoBNet
from fewshotsam_lab.fob_training.episodes import make_episode
from fewshotsam_lab.fob_training.losses import COOR_LOSSES, LossWeights, fob_losses
from fewshotsam_lab.fob_training.train import heldback_errors

SMALL = dict(in_channels=16, dim=16, grid=16, frame_size=64, token_grid=8, heads=2, sigma=2.0, ring_inner=2,
             ring_outer=3, n_bg=6, n_fg=4, k_offsets=4)


def _disc(size: int, centre, radius) -> np.ndarray:
    r, c = np.mgrid[:size, :size]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


def test_angle_spaced_ring_points_lie_on_their_rays():
    """On an elongated ellipse, angle-spaced point i lies on the ray at (i + 0.5) * 36 degrees from the
    centroid (clockwise from the top, on the ring); pixel-spaced points do not (they crowd where the ring
    is long)."""
    r, c = np.mgrid[:128, :128]
    m = ((r - 64) / 14.0) ** 2 + ((c - 64) / 40.0) ** 2 <= 1
    rays = (np.arange(10) + 0.5) * 2 * np.pi / 10
    off = {}
    for s in ("pixels", "angle"):
        pts = ring_points(m, 10, 6, 7, spacing=s)
        ang = np.mod(np.arctan2(pts[:, 1] - 64, -(pts[:, 0] - 64)), 2 * np.pi)
        assert np.all(np.diff(ang) > 0)  # clockwise from the top
        off[s] = np.abs(np.angle(np.exp(1j * (ang - rays))))
        inside = ((pts[:, 0] - 64) / 14.0) ** 2 + ((pts[:, 1] - 64) / 40.0) ** 2 <= 1
        assert not inside.any()
    assert off["angle"].max() < 0.12
    assert off["pixels"].max() > 0.2


def test_legacy_weights_keep_their_behaviour():
    old = FoBConfig.from_dict({"dim": 16})
    assert old.ring_spacing == "pixels" and not old.spatial_prior and not old.spr_context
    new = FoBConfig.from_dict(FoBConfig().to_dict())
    assert new.ring_spacing == "angle" and new.spatial_prior and new.spr_context


def test_spatial_window_prefers_the_match_near_the_support_point():
    """The query holds the support point's patch twice: an exact copy far away and a noisy copy in place.
    The whole-image matching prior peaks at the far copy, the windowed one at the support point."""
    torch.manual_seed(0)
    peaks = {}
    for spatial in (False, True):
        cfg = FoBConfig(**SMALL, spatial_prior=spatial, prior_sigma=8.0)
        net = FoBNet(cfg)
        se = torch.randn(1, 16, 16, 16)
        sp = torch.tensor([[[18.0, 18.0]]]).repeat(1, cfg.n_bg, 1)  # cell (4, 4)
        qe = se + 0.3 * torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
        qe[..., 10:15, 10:15] = se[..., 2:7, 2:7]  # exact copy of the patch around cell (4, 4) at (12, 12)
        with torch.no_grad():
            protos = net.features(se)[:, :, 4, 4][:, None].repeat(1, cfg.n_bg, 1)
            prior = net.matching_prior(protos, net.features(qe), sp)
        flat = int(prior[0, 0].argmax())
        peaks[spatial] = divmod(flat, 16)
    assert peaks[False] == (12, 12)
    assert abs(peaks[True][0] - 4) <= 1 and abs(peaks[True][1] - 4) <= 1


def _toy_episode(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    se = torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g)
    qe = torch.roll(se, (1, 1), dims=(1, 2)) + 0.1 * torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g)
    sm = _disc(cfg.frame_size, (30, 28), 10)
    qm = _disc(cfg.frame_size, (33, 32), 11)
    return make_episode(se, sm, qe, qm, cfg.n_bg, cfg.ring_inner, cfg.ring_outer, spacing=cfg.ring_spacing)


def test_spr_learns_to_move_the_coarse_points_towards_the_ring():
    """Training SPR alone on one toy episode with the pixel coordinate loss: the refined points leave the
    coarse ones and their coordinate loss falls below its start and below the coarse points' loss."""
    torch.manual_seed(0)
    cfg = FoBConfig(**SMALL)
    net = FoBNet(cfg)
    ep = _toy_episode(cfg)
    opt = torch.optim.Adam(net.spr.parameters(), lr=3e-3)
    wts = LossWeights(lambda_heat=0.0, lambda_coor=1.0, coor_loss="smooth_l1")
    first = None
    for _ in range(60):
        out = net(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
        loss = fob_losses(out, ep, cfg, wts)["coor"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = net(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
    last = float(fob_losses(out, ep, cfg, wts)["coor"].detach())
    coarse = float(COOR_LOSSES["smooth_l1"](out.coarse - ep.query_points).detach())
    assert float((out.refined - out.coarse).norm(dim=-1).mean().detach()) > 0.5
    assert last < 0.7 * first and last < 0.7 * coarse


def test_coordinate_losses_measure_pixels():
    d = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    assert float(COOR_LOSSES["mse"](d)) == 12.5  # (9 + 16) / 2
    assert float(COOR_LOSSES["l1"](d)) == 3.5
    assert abs(float(COOR_LOSSES["smooth_l1"](d)) - 3.0) < 1e-6  # (2.5 + 3.5) / 2


class _Prepared:
    """A prepared volume as the episode sampler reads it: a key per slice and the valid frame region."""

    def __init__(self, size: int) -> None:
        self.valid = np.ones((size, size), bool)

    def key(self, z: int) -> str:
        return f"slice{z}"

    def frame_for_key(self, key):  # pragma: no cover - the dictionary cache below never encodes
        raise AssertionError("not encoded in this test")


class _DictCache:
    def __init__(self, embeddings: dict) -> None:
        self.embeddings = embeddings

    def get(self, key, frame_fn=None):
        return self.embeddings[key]


def test_heldback_evaluation_returns_coarse_refined_and_reference_errors():
    cfg = FoBConfig(**SMALL)
    g = torch.Generator().manual_seed(0)
    size = cfg.frame_size
    labels = np.stack([_disc(size, (30, 28), 10), _disc(size, (32, 31), 10)]).astype(np.int32)
    vol = SimpleNamespace(name="toy", prepared=_Prepared(size), labels=labels, pairs=[(0, 1, 1), (1, 0, 1)],
                          ends=[])
    cache = _DictCache({f"slice{z}": torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g) for z in (0, 1)})
    torch.manual_seed(0)
    net = FoBNet(cfg)
    hb = heldback_errors(net, [vol], cache, 6)
    for prefix in ("", "aug_"):
        for k in ("coarse", "refined", "support", "ring_coarse", "ring_refined", "ring_support"):
            assert np.isfinite(hb[prefix + k]) and hb[prefix + k] >= 0, prefix + k
    # the support ring copied onto the other slice: its error is the mean shift of the ring points
    sp = ring_points(labels[0] > 0, cfg.n_bg, cfg.ring_inner, cfg.ring_outer, spacing=cfg.ring_spacing)
    qp = ring_points(labels[1] > 0, cfg.n_bg, cfg.ring_inner, cfg.ring_outer, spacing=cfg.ring_spacing)
    assert abs(hb["support"] - np.linalg.norm(sp - qp, axis=1).mean()) < 1e-4
    assert net.training  # the mode is restored
    assert heldback_errors(net, [vol], cache, 6) == hb  # fixed episodes: the same figures again
