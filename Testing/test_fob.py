"""FoB: network, losses, episodes, supervoxels, training resume, generator and shipped weights.

Includes one test per defect of the authors' public code that ours must not have:
SPR gets gradients, the bilinear sampler gets correctly normalised coordinates, ground-truth and predicted
ring orders agree, and inference needs no query mask.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHAOS_DIR as DATA
from conftest import SHARED_EMBEDDINGS
from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.fob.inference import ring_points
from FewShotSAMLib.fob.model import FoBConfig, FoBNet, bilinear_sample, gaussian_heatmaps, grid_argmax
from FewShotSAMLib.prompts.base import QueryContext, Support
from fewshotsam_lab.fob_training.episodes import Augment, find_pairs, make_episode
from fewshotsam_lab.fob_training.losses import fob_losses
from fewshotsam_lab.fob_training.supervoxels import supervoxels

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(in_channels=16, dim=16, grid=16, frame_size=64, token_grid=8, heads=2, sigma=2.0, ring_inner=2,
             ring_outer=3, n_bg=6, n_fg=4, k_offsets=4)


def _disc(size: int, centre, radius) -> np.ndarray:
    r, c = np.mgrid[:size, :size]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


def _episode(cfg: FoBConfig, shift=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    se = torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g)
    qe = torch.randn(cfg.in_channels, cfg.grid, cfg.grid, generator=g)
    sm = _disc(cfg.frame_size, (30, 28), 10)
    qm = _disc(cfg.frame_size, (30 + shift[0], 28 + shift[1]), 10)
    return make_episode(se, sm, qe, qm, cfg.n_bg, cfg.ring_inner, cfg.ring_outer)


# ---- defect guards --------------------------------------------------------------------------------
def test_every_spr_parameter_gets_a_gradient():
    cfg = FoBConfig(**SMALL)
    torch.manual_seed(0)
    net = FoBNet(cfg)
    ep = _episode(cfg)
    out = net(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
    fob_losses(out, ep, cfg)["total"].backward()
    for name, p in net.spr.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0, name


def test_bilinear_sampler_returns_the_feature_at_a_known_point():
    feat = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    # cell (3, 5) of an 8-cell grid over a 64-pixel frame has its centre at model pixel 8*3+3.5
    pt = torch.tensor([[[3 * 8 + 3.5, 5 * 8 + 3.5]]])
    got = bilinear_sample(feat, pt, 64)[0, 0]
    assert torch.allclose(got, feat[0, :, 3, 5])
    # halfway between two cells averages them
    pt = torch.tensor([[[3 * 8 + 3.5, 5 * 8 + 7.5]]])
    got = bilinear_sample(feat, pt, 64)[0, 0]
    assert torch.allclose(got, (feat[0, :, 3, 5] + feat[0, :, 3, 6]) / 2)


def test_ground_truth_and_prediction_orders_agree():
    cfg = FoBConfig(**SMALL)
    sm = _disc(64, (30, 28), 10)
    qm = _disc(64, (34, 31), 10)
    sp, qp = ring_points(sm, 6, 2, 3), ring_points(qm, 6, 2, 3)
    # the same function orders both: point i of the query is point i of the support moved with the target
    assert np.abs(qp - sp - np.array([4, 3])).max() <= 2.0
    # channel i of the prediction is scored against ground-truth point i: a prediction equal to the
    # ground truth has zero heat loss, a rotated one does not
    target = gaussian_heatmaps(torch.from_numpy(qp)[None], cfg.grid, cfg.frame_size, cfg.sigma)
    assert np.allclose(grid_argmax(target, 64)[0].numpy(), qp, atol=64 / 16 / 2 + 1e-4)
    rolled = torch.roll(target, 1, dims=1)
    assert float(((rolled - target) ** 2).mean()) > 1e-3


def test_inference_needs_no_query_mask():
    import inspect

    from FewShotSAMLib.prompts.fob import FoBGenerator

    params = inspect.signature(FoBGenerator.predict).parameters
    assert list(params) == ["self", "support", "query", "valid"]
    gen = _small_generator()
    cfg = gen.cfg
    sup = Support(torch.randn(cfg.in_channels, cfg.grid, cfg.grid), _disc(64, (30, 28), 10))
    p = gen.generate(sup, torch.randn(cfg.in_channels, cfg.grid, cfg.grid),
                     QueryContext(None, np.ones((64, 64), bool)), _FakeBackend())
    assert p.box is not None and 0.0 <= p.presence <= 1.0


# ---- pieces -------------------------------------------------------------------------------------
def test_ring_points_lie_on_the_ring_clockwise_from_top():
    m = _disc(128, (64, 64), 20)
    pts = ring_points(m, 10, 6, 7)
    assert pts.shape == (10, 2)
    d = np.hypot(pts[:, 0] - 64, pts[:, 1] - 64)
    assert np.all((d > 20 + 5) & (d < 20 + 7 * 1.5 + 1))
    ang = np.mod(np.arctan2(pts[:, 1] - 64, -(pts[:, 0] - 64)), 2 * np.pi)
    assert np.all(np.diff(ang) > 0)  # clockwise order from the top
    assert ring_points(np.zeros((8, 8), bool), 10, 6, 7).shape == (0, 2)


def test_gaussian_heatmap_peaks_at_the_point():
    pts = torch.tensor([[[100.0, 37.0]]])
    h = gaussian_heatmaps(pts, 64, 256, 4.0)
    r, c = np.unravel_index(int(h.argmax()), (64, 64))
    assert (r, c) == (25, 9)  # cell centres at 4k + 1.5


def test_augment_moves_embedding_and_mask_together():
    rng = np.random.default_rng(1)
    emb = torch.zeros(1, 16, 16)
    emb[0, 4:8, 6:10] = 1
    mask = np.zeros((64, 64), bool)
    mask[16:32, 24:40] = True
    aug = Augment(p=1.0, jitter=0.0, noise=0.0)
    e2, m2 = aug(rng, emb, mask)
    hot = torch.nn.functional.interpolate(e2[None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0] > 0.5
    inter = (hot.numpy() & m2).sum()
    assert inter / max(1, m2.sum()) > 0.7 and not np.array_equal(m2, mask)


def test_find_pairs_needs_both_slices_big_enough_and_respects_exclusion():
    lab = np.zeros((3, 32, 32), np.int32)
    lab[0, :15, :15] = 1  # 225 px
    lab[1, :15, :15] = 1
    lab[2, :5, :5] = 1  # too small
    pairs, ends = find_pairs(lab, 200)
    assert sorted(pairs) == [(0, 1, 1), (1, 0, 1)]
    pairs, _ = find_pairs(lab, 200, excluded=np.array([False, True, False]))
    assert pairs == []


def test_supervoxels_split_distinct_blocks_and_keep_outside_zero():
    vol = np.zeros((6, 40, 40), np.float32)
    vol[:, 5:35, 5:20] = 0.4
    vol[:, 5:35, 20:35] = 0.9
    lab = supervoxels(vol, (5.0, 2.5, 2.5), target_mm=2.5, sigma_mm=1.0, k=0.05, min_size_mm3=500)
    assert lab[0, 0, 0] == 0
    assert lab[3, 20, 10] > 0 and lab[3, 20, 30] > 0 and lab[3, 20, 10] != lab[3, 20, 30]


def test_ablation_switches_run():
    for kw in ({"use_bcm": False}, {"use_spr": False}, {"use_ring_graph": False}):
        cfg = FoBConfig(**SMALL, **kw)
        net = FoBNet(cfg)
        ep = _episode(cfg)
        out = net(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
        loss = fob_losses(out, ep, cfg)["total"]
        loss.backward()
        assert torch.isfinite(loss)


# ---- generator and weights ------------------------------------------------------------------------
class _FakeBackend:
    """Stands in for the SAM backend (the generator only reads its name, size, box preference and whether a
    propagated box may grow)."""

    name = "tiny"
    input_size = 64
    prefers_box = True
    grows_box = True


def _save_small(path: Path, backend="tiny") -> Path:
    from FewShotSAMLib.sam.weights import sha256_of

    cfg = FoBConfig(**SMALL)
    torch.manual_seed(0)
    torch.save({"config": cfg.to_dict(), "state_dict": FoBNet(cfg).state_dict(), "calibration": {}}, path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_of(path), "sam_backend": backend}))
    return path


_TMP = {}


def _small_generator(tmp=None):
    from FewShotSAMLib.prompts.fob import FoBGenerator

    if "dir" not in _TMP:
        import tempfile

        _TMP["dir"] = Path(tempfile.mkdtemp())
    return FoBGenerator(weights=_save_small(_TMP["dir"] / "fob.pt"))


def test_generator_checks_sha_and_backend(tmp_path):
    from FewShotSAMLib.prompts.fob import FoBGenerator

    path = _save_small(tmp_path / "fob.pt")
    gen = FoBGenerator(weights=path)
    cfg = gen.cfg
    sup = Support(torch.randn(cfg.in_channels, cfg.grid, cfg.grid), _disc(64, (30, 28), 10))
    q = torch.randn(cfg.in_channels, cfg.grid, cfg.grid)
    ctx = QueryContext(None, np.ones((64, 64), bool))

    class Other(_FakeBackend):
        name = "litemedsam"

    with pytest.raises(UserInputError, match="trained on tiny"):
        gen.generate(sup, q, ctx, Other())
    for mode in ("points", "box", "box+bg", "box+points"):
        p = FoBGenerator(weights=path, mode=mode).generate(sup, q, ctx, _FakeBackend())
        assert (p.box is not None) == mode.startswith("box")
        assert len(p.bg_points) == (0 if mode == "box" else cfg.n_bg)
        assert np.all((p.bg_points >= 0) & (p.bg_points <= 63))
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserInputError, match="SHA-256"):
        FoBGenerator(weights=path)
    with pytest.raises(UserInputError, match="do not exist"):
        FoBGenerator(weights=tmp_path / "missing.pt")


def test_shipped_weights_load_and_match_metadata():
    from FewShotSAMLib.prompts.fob import SHIPPED_WEIGHTS, FoBGenerator

    if not SHIPPED_WEIGHTS.exists():
        pytest.skip("no shipped FoB weights in FewShotSAMLib/fob/weights yet")
    meta = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    gen = FoBGenerator()
    assert meta["sam_backend"] == "litemedsam" and gen.backend_name == "litemedsam"
    assert SHIPPED_WEIGHTS.stat().st_size < 5 << 20
    assert meta["iterations"] > 0 and meta["data"]
    # the shipped model: all 20 CHAOS volumes, unlabeled (no label was used: Setting I without exclusions)
    assert len(meta["data"]) == 20 and meta["fold"] is None and meta["exclude_labels"] == []
    assert meta["prompt_modes"]["litemedsam"] in ("box", "box+bg", "box+points", "points")

    class PointsBackend:  # litemedsam-points: its own recorded mode before the embeddings' (docs/FOB.md)
        name, embedding_name, prefers_box = "litemedsam-points", "litemedsam", True

    assert gen.prompt_mode(PointsBackend()) == meta["prompt_modes"]["litemedsam-points"] == "box+points"


def test_each_sam_model_gets_the_fob_weights_trained_on_its_embeddings():
    """LiteMedSAM's weights for both LiteMedSAM models (one image encoder), MobileSAM's own for ``vit_t``:
    ``make_generator('fob', sam=...)`` (what the engine, the command line and Slicer call) loads them, each
    refuses the other's embeddings, and ``auto`` reads each model's own calibration."""
    from FewShotSAMLib.fob import LITEMEDSAM_WEIGHTS, shipped_weights
    from FewShotSAMLib.prompts import make_generator, recommended_generator

    assert shipped_weights() == shipped_weights("litemedsam") == shipped_weights("litemedsam-points") == LITEMEDSAM_WEIGHTS
    path = shipped_weights("vit_t")
    assert path != LITEMEDSAM_WEIGHTS and path.is_file() and path.stat().st_size < 5 << 20
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["data"]) == 20 and meta["fold"] is None and meta["exclude_labels"] == []  # unlabeled CHAOS
    gen = make_generator("fob", sam="vit_t")
    assert gen.path == path and gen.backend_name == meta["sam_backend"] == "vit_t" and gen.cfg.frame_size == 1024

    class MobileSAM:
        name = embedding_name = "vit_t"
        input_size, prefers_box = 1024, False

    class LiteMedSAM:
        name, embedding_name, input_size = "litemedsam-points", "litemedsam", 256

    assert gen.prompt_mode(MobileSAM()) == meta["prompt_modes"]["vit_t"]
    # calibrated inside the propagation for vit_t, and ahead of box propagation there: what 'auto' gives it
    assert gen.min_corr == meta["propagation"]["min_corr"] and meta["propagation"]["sam_backend"] == "vit_t"
    neighbour = np.zeros((1024, 1024), bool)
    neighbour[400:500, 400:500] = True
    assert gen.prompt_mode(MobileSAM(), QueryContext(neighbour, np.ones_like(neighbour))) == "propagate"
    assert recommended_generator("vit_t") == "fob"
    assert meta["propagation"]["cv_dice"] > meta["propagation"]["boxprop_cv_dice"]
    query = torch.zeros(256, 64, 64)
    gen._check(MobileSAM(), query)
    with pytest.raises(UserInputError, match="trained on vit_t"):
        gen._check(LiteMedSAM(), query)
    with pytest.raises(UserInputError, match="trained on litemedsam"):
        make_generator("fob", sam="litemedsam-points")._check(MobileSAM(), query)


# ---- training: resumes after an interruption --------------------------------------------------------
@pytest.mark.skipif(not DATA.exists(), reason="CHAOS data absent (../shared/data/chaos_t2)")
def test_train_resumes_from_its_checkpoint(tmp_path, litemedsam):
    """Two tiny trainings on one cached volume: the second, asked for more iterations, resumes; a held-back
    volume of the evaluation fold is evaluated along the way."""
    from fewshotsam_lab import evaluate as E
    from fewshotsam_lab.fob_training import train
    from FewShotSAMLib.sam.cache import EmbeddingCache

    cache_dir = SHARED_EMBEDDINGS
    # volume 1 to train on, volume 2 (fold 0, not trained on) held back: both in the shared cache first,
    # as --cached-only trains and evaluates only on cached slices (a fresh clone has none)
    store = E.CaseStore([c for c in E.list_cases(DATA) if c[0] in (1, 2)], litemedsam,
                        EmbeddingCache(litemedsam, persist_dir=cache_dir))
    for vid in (1, 2):
        pv = store.get(vid).prepared
        pv.encode(store.cache, range(pv.n_slices))
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tmp_path / "fob.pt"
    base = ["--data", str(DATA), "--out", str(out), "--volumes", "1", "--cached-only", "--cache-dir", str(cache_dir),
            "--work-dir", str(REPO / ".cache" / "fob"), "--checkpoint-every", "2", "--calibration-episodes", "3",
            "--dim", "16", "--token-grid", "16", "--eval-fold", "0", "--eval-episodes", "2", "--eval-every", "2"]
    assert train.run(parser.parse_args(base + ["--iterations", "2"])) == 0
    resume = torch.load(out.with_name("fob.resume.pt"), weights_only=False)
    assert resume["iteration"] == 2
    first = torch.load(out, weights_only=False)["state_dict"]
    assert train.run(parser.parse_args(base + ["--iterations", "4"])) == 0
    assert torch.load(out.with_name("fob.resume.pt"), weights_only=False)["iteration"] == 4
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["iterations"] == 4 and meta["sam_backend"] == "litemedsam"
    # held-back evaluation on fold 0's cached volumes other than the training volume 1: logged and in the metadata
    assert "image_2.nii.gz" in meta["heldback"]["volumes"] and "image_1.nii.gz" not in meta["heldback"]["volumes"]
    assert all(meta["heldback"]["final"][k] >= 0 for k in ("coarse", "refined", "support", "aug_coarse"))
    rows = list(csv.DictReader(open(out.with_name("fob.log.csv"))))
    assert rows[0]["iteration"] == "0" and rows[0]["hb_coarse"] and rows[-1]["hb_refined"]
    assert meta["loss_weights"]["heat_loss"] == "ce" and meta["command"].startswith("python tools/lab.py train-fob")
    assert out.with_name("fob.loss.png").exists() and out.with_name("fob.log.csv").exists()
    second = torch.load(out, weights_only=False)["state_dict"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
