"""``python tools/lab.py train-fob``: self-supervised FoB training on supervoxel pseudo-labels.

Embeddings come from the persistent embedding cache (each slice is encoded once, ever); labels are never
read except to drop slices for Setting II (``--exclude-labels``). The run checkpoints every
``--checkpoint-every`` iterations next to ``--out`` and resumes from there after an interruption; it logs
the losses to ``<out>.log.csv`` and draws ``<out>.loss.png``. At the end it calibrates, on pseudo-label
episodes only, the box margin and the presence score, and writes the weights ``--out`` with a metadata
file ``<out stem>.json`` (SHA-256, SAM backend, config, iterations, data list, date, timings).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.fob.inference import presence_features
from FewShotSAMLib.fob.model import FoBConfig, FoBNet, count_parameters
from FewShotSAMLib.sam.weights import sha256_of
from FewShotSAMLib.volume import atomic_write, atomic_write_text

from ..datasets import fold_volume_ids, list_cases
from .episodes import Augment, EpisodeSampler, load_volume_episodes
from .losses import COOR_LOSSES, LossWeights, fob_losses, point_error

log = logging.getLogger(__name__)

#: held-back point errors of one episode half (``heldback_errors``), plain then with the ``aug_`` prefix
HELD_BACK_ERRORS = ("coarse", "refined", "support", "ring_coarse", "ring_refined", "ring_support")
HELD_BACK_KEYS = HELD_BACK_ERRORS + tuple("aug_" + k for k in HELD_BACK_ERRORS)
LOG_FIELDS = ["iteration", "seconds", "total", "rac", "heat", "coor", "fore", "err_coarse", "err_refined", "lr",
              *("hb_" + k for k in HELD_BACK_KEYS)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``train-fob`` command."""
    parser.add_argument("--data", required=True, help="folder with image_<id>.nii.gz volumes (labels unused)")
    parser.add_argument("--out", required=True, help="weights file to write, e.g. FewShotSAMLib/fob/weights/fob.pt")
    parser.add_argument("--iterations", type=int, default=3000, help="training iterations (batch 1)")
    parser.add_argument("--exclude-labels", type=int, nargs="*", default=[],
                        help="Setting II: drop slices holding any of these labels (needs label_<id>.nii.gz)")
    parser.add_argument("--fold", type=int, default=None,
                        help="train on the volumes outside CHAOS cross-validation fold 0-4 (default: all)")
    parser.add_argument("--volumes", type=str, default=None, help="comma-separated volume ids to use")
    parser.add_argument("--sam", default="litemedsam", help="SAM backend whose embeddings FoB uses")
    parser.add_argument("--cache-dir", default=".cache/embeddings", help="persistent embedding cache")
    parser.add_argument("--work-dir", default=".cache/fob", help="supervoxel cache")
    parser.add_argument("--cached-only", action="store_true",
                        help="use only slices whose embeddings are cached already (never encode)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--decay", type=float, default=0.95, help="learning-rate factor every 1000 iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--token-grid", type=int, default=32, choices=[16, 32, 64])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ring", type=int, nargs=2, default=[6, 7], metavar=("INNER", "OUTER"),
                        help="ring between these chessboard distances from the mask (paper: 6 7 = kernels 13/15)")
    parser.add_argument("--no-bcm", action="store_true", help="ablation: plain prototype matching")
    parser.add_argument("--no-spr", action="store_true", help="ablation: no structure-guided refinement")
    parser.add_argument("--no-ring-graph", action="store_true", help="ablation: adaptive graph only")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--ring-spacing", default="angle", choices=["angle", "pixels"],
                        help="ring point i on the ray at angle i (default) or by ring-pixel count (first recipe)")
    parser.add_argument("--no-spatial-prior", action="store_true",
                        help="matching prior over the whole query (first recipe) instead of a window at the support point")
    parser.add_argument("--prior-sigma", type=float, default=24.0, help="initial window width (model-frame px)")
    parser.add_argument("--prior-t", type=float, default=0.05, help="initial temperature of the matching prior")
    parser.add_argument("--max-gap", type=int, default=1,
                        help="training pairs up to this many slices apart (1: adjacent; held-back episodes stay adjacent)")
    parser.add_argument("--no-spr-context", action="store_true",
                        help="SPR offsets from query features only (paper) instead of with prototype, C and support point")
    parser.add_argument("--calibration-episodes", type=int, default=150)
    parser.add_argument("--lambda-heat", type=float, default=LossWeights.lambda_heat, help="weight of L_heat (paper: 1e3 with --heat-loss mse)")
    parser.add_argument("--lambda-coor", type=float, default=LossWeights.lambda_coor, help="weight of L_coor (paper: 1e-4 with --coor-loss mse)")
    parser.add_argument("--heat-loss", default=LossWeights.heat_loss, choices=["mse", "ce"],
                        help="L_heat: 'mse' on heatmaps (paper) or 'ce', each channel's softmax over the grid "
                             "against the normalised target Gaussian (then SPR learns from L_coor alone)")
    parser.add_argument("--no-log-heat", action="store_true",
                        help="head residual added to the prior itself (first recipe), not to its logits")
    parser.add_argument("--coor-loss", default=LossWeights.coor_loss, choices=list(COOR_LOSSES),
                        help="L_coor: 'mse' squared model-frame pixels (paper), 'l1' / 'smooth_l1' in pixels")
    parser.add_argument("--eval-fold", type=int, default=None,
                        help="held-back evaluation on the volumes of this fold (default: --fold's own test "
                             "volumes; none without --fold)")
    parser.add_argument("--eval-episodes", type=int, default=100,
                        help="fixed held-back episodes per evaluation (half plain, half augmented)")
    parser.add_argument("--eval-every", type=int, default=100, help="iterations between held-back evaluations")


def _volume_list(args) -> list[tuple[int, Path, Optional[Path]]]:
    """The training volumes (labels only read for --exclude-labels): --data's images, selected by
    --volumes, without the test volumes of --fold."""
    cases = list_cases(args.data, labels=False)
    if args.volumes:
        want = {int(v) for v in args.volumes.split(",") if v.strip()}
        cases = [c for c in cases if c[0] in want]
    if args.fold is not None:
        test = set(fold_volume_ids([c[0] for c in cases], args.fold))
        cases = [c for c in cases if c[0] not in test]
    if not cases:
        raise UserInputError("No training volume is left after --volumes/--fold; check the selection.")
    return cases


def _log_heldback(it: int, hb: dict) -> None:
    g = lambda k: hb.get(k, float("nan"))  # noqa: E731
    log.info("it %d  held-back point error coarse %.2f refined %.2f (support copied %.2f), to the ring %.2f / %.2f "
             "(%.2f); augmented %.2f / %.2f (%.2f), to the ring %.2f / %.2f (%.2f) px", it,
             *[g(k) for k in HELD_BACK_KEYS])


def _heldback_list(args) -> list[tuple[int, Path, Optional[Path]]]:
    """The held-back volumes: those of --eval-fold (default --fold), minus any training volume."""
    fold = args.eval_fold if args.eval_fold is not None else args.fold
    if fold is None or args.eval_episodes <= 0:
        return []
    cases = list_cases(args.data, labels=False)
    test = set(fold_volume_ids([c[0] for c in cases], fold))
    train_ids = {c[0] for c in _volume_list(args)}
    return [c for c in cases if c[0] in test and c[0] not in train_ids]


def _load_volumes(args, cases, backend, cache, max_gap: int = 1) -> list:
    """Episode pairs of each volume (supervoxels cached under --work-dir); with --cached-only only pairs
    whose two slices are in the embedding cache, else the missing slices are encoded."""
    volumes = []
    for vid, img, lab in cases:
        v = load_volume_episodes(img, backend, Path(args.work_dir), exclude_labels=args.exclude_labels,
                                 label_path=lab, max_gap=max_gap)
        if args.cached_only:
            have = {z for z in range(v.prepared.n_slices) if v.prepared.key(z) in cache}
            v.pairs = [p for p in v.pairs if p[0] in have and p[1] in have]
            v.ends = [p for p in v.ends if p[0] in have and p[1] in have]
        else:
            log.info("encoding missing slices of %s (if any)", img.name)
            v.prepared.encode(cache, range(v.prepared.n_slices))
        log.info("%s: %d episode pairs, %d end pairs", img.name, len(v.pairs), len(v.ends))
        if v.pairs:
            volumes.append(v)
    return volumes


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_losses(rows: list[dict], path: Path, weights: Optional[LossWeights] = None) -> None:
    """Loss curves (log scale, moving average) and point errors (training episodes, moving average;
    held-back episodes, markers) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if "total" in r]
    if not rows:
        return
    it = np.array([r["iteration"] for r in train_rows], float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = weights or LossWeights()
    for key, scale in (("total", 1), ("rac", 1), ("heat", w.lambda_heat), ("coor", w.lambda_coor), ("fore", 1)):
        y = np.array([float(r[key]) for r in train_rows]) * scale
        k = max(1, len(y) // 30)
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        axes[0].plot(it[k - 1:], ys, label=f"{key}" + (f" x{scale:g}" if scale != 1 else ""))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration")
    axes[0].set_title("weighted loss terms (moving average)")
    axes[0].legend()
    for key in ("err_coarse", "err_refined"):
        y = np.array([float(r[key]) for r in train_rows])
        k = max(1, len(y) // 30)
        axes[1].plot(it[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), label=key + " (training)")
    for key, marker in (("hb_coarse", "o"), ("hb_refined", "x"), ("hb_support", "."), ("hb_aug_coarse", "s"),
                        ("hb_aug_refined", "+")):
        pts = [(r["iteration"], float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            axes[1].plot(*zip(*pts), marker=marker, linestyle=":", label=key[3:] + " (held-back)")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("mean point error (px, 256 frame)")
    axes[1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Held-back evaluation: fixed pseudo-label episodes from volumes the model does not train on
# ------------------------------------------------------------------------------------------------
def ring_distance_map(mask: np.ndarray, cfg: FoBConfig) -> np.ndarray:
    """Distance (model-frame pixels) of every pixel to the query's ring (0 on it)."""
    from scipy import ndimage

    from FewShotSAMLib.prompts.features import ring

    band = ring(mask, cfg.ring_inner, cfg.ring_outer)
    return ndimage.distance_transform_edt(~band) if band.any() else np.zeros(mask.shape)


def _at(dist: np.ndarray, pts: torch.Tensor) -> float:
    """Mean of ``dist`` at the (rounded, clipped) points."""
    p = pts.round().long().clamp(0, dist.shape[0] - 1).numpy()
    return float(dist[p[:, 0], p[:, 1]].mean())


@torch.no_grad()
def heldback_errors(model: FoBNet, volumes: list, cache, n: int, seed: int = 12345) -> dict:
    """Mean point error (model-frame pixels) on ``n`` fixed episodes of ``volumes``: ``n // 2`` plain
    adjacent-slice episodes and ``n - n // 2`` augmented ones (the training augmentation, fixed seed).
    Keys ``coarse`` / ``refined`` (the network's points), ``support`` (the support ring copied unchanged
    onto the query: the no-motion reference); ``ring_*`` the same points' distance to the query's ring
    (whatever ring point they hit: the error across the ring, without the one along it); each also with
    the ``aug_`` prefix for the augmented half.
    The same seed gives the same episodes at every call."""
    was_training = model.training
    model.eval()
    result = {}
    try:
        for prefix, augment, count in (("", None, n // 2), ("aug_", Augment(), n - n // 2)):
            if count <= 0:
                continue
            sampler = EpisodeSampler(volumes, cache, model.cfg, augment, seed=seed)
            errs = []
            for _ in range(count):
                ep = sampler.sample()
                out = model(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
                c, r = point_error(out, ep)
                s = float((ep.support_points - ep.query_points).norm(dim=-1).mean())
                dist = ring_distance_map(ep.query_mask[0].numpy() > 0.5, model.cfg)
                errs.append((c, r, s, _at(dist, out.coarse[0]), _at(dist, out.refined[0]), _at(dist, ep.support_points[0])))
            e = np.mean(errs, 0)
            result.update({prefix + k: float(x) for k, x in zip(HELD_BACK_ERRORS, e)})
    finally:
        model.train(was_training)
    return result


# ------------------------------------------------------------------------------------------------
# Calibration on pseudo-label episodes (no annotations)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(model: FoBNet, sampler: EpisodeSampler, n: int) -> dict:
    """Box margin (ring box -> mask box) and the presence logistic model, from pseudo-label episodes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    model.eval()
    aug, sampler.augment = sampler.augment, None
    margins, feats, ys, errs = [], [], [], []
    try:
        for label, ends in ((1, False), (0, True)):
            if label == 0 and not any(v.ends for v in sampler.volumes):
                continue
            for _ in range(n):
                ep = sampler.sample(ends=ends)
                out = model(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
                h = out.heatmaps.shape[-1]
                sa = float(torch.nn.functional.adaptive_avg_pool2d(ep.support_mask[:, None], h).sum())
                feats.append(presence_features(out.corr[0], out.heatmaps[0], sa))
                ys.append(label)
                if label == 1:
                    pts = out.refined[0].numpy()
                    rows, cols = np.nonzero(ep.query_mask[0].numpy() > 0.5)
                    mb = np.array([rows.min(), cols.min(), rows.max(), cols.max()], float)
                    rb = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
                    margins.extend([mb[0] - rb[0], mb[1] - rb[1], rb[2] - mb[2], rb[3] - mb[3]])
                    errs.append(point_error(out, ep)[1])
    finally:
        sampler.augment = aug
        model.train()
    feats, ys = np.array(feats), np.array(ys)
    result = {"box_margin": float(np.median(margins)), "box_margin_per_side_mean": float(np.mean(margins)),
              "calibration_point_error": float(np.mean(errs)), "episodes": int(len(ys))}
    if len(set(ys.tolist())) == 2:
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        lr = LogisticRegression(C=1.0).fit((feats - mu) / sd, ys)
        p = lr.predict_proba((feats - mu) / sd)[:, 1]
        result["presence"] = {"mean": mu.tolist(), "std": sd.tolist(), "coef": lr.coef_[0].tolist(),
                              "intercept": float(lr.intercept_[0]), "features": ["max_corr", "log_area_ratio", "mean_peak"],
                              "auc": float(roc_auc_score(ys, p)),
                              "accuracy_at_0.5": float(((p > 0.5) == ys).mean())}
    return result


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Train (or resume) and write the weights + metadata; returns the process exit code."""
    torch.set_num_threads(max(1, int(args.threads)))
    out = Path(args.out)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    resume_path = out.with_name(out.stem + ".resume.pt")
    log_path = out.with_name(out.stem + ".log.csv")
    png_path = out.with_name(out.stem + ".loss.png")

    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache

    backend = load_backend(args.sam, "cpu")
    cache = EmbeddingCache(backend, cap_bytes=768 << 20, persist_dir=args.cache_dir)
    cfg = FoBConfig(dim=args.dim, token_grid=args.token_grid, ring_inner=args.ring[0], ring_outer=args.ring[1],
                    use_bcm=not args.no_bcm, use_spr=not args.no_spr, use_ring_graph=not args.no_ring_graph,
                    frame_size=backend.input_size, ring_spacing=args.ring_spacing,
                    spatial_prior=not args.no_spatial_prior, prior_sigma=args.prior_sigma, prior_t=args.prior_t,
                    spr_context=not args.no_spr_context, log_heat=not args.no_log_heat)
    t_prep = time.perf_counter()
    volumes = _load_volumes(args, _volume_list(args), backend, cache, args.max_gap)
    used = [v.name for v in volumes]
    eval_cases = _heldback_list(args)
    heldback = _load_volumes(args, eval_cases, backend, cache) if eval_cases else []
    if heldback:
        log.info("held-back evaluation on %s", ", ".join(v.name for v in heldback))
    if not volumes:
        raise UserInputError("No usable training volume (no cached embeddings or no supervoxel pairs).")
    probe = cache.get(volumes[0].prepared.key(volumes[0].pairs[0][0]))
    cfg.in_channels, cfg.grid = int(probe.shape[0]), int(probe.shape[-1])
    prep_seconds = time.perf_counter() - t_prep

    torch.manual_seed(args.seed)
    model = FoBNet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=args.decay)
    sampler = EpisodeSampler(volumes, cache, cfg, None if args.no_augment else Augment(), seed=args.seed)
    start, rows, train_seconds = 0, [], 0.0
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        if state.get("config") == cfg.to_dict():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, rows, train_seconds = state["iteration"], state["rows"], state["train_seconds"]
            sampler.rng = np.random.default_rng([args.seed, start])
            torch.manual_seed(args.seed + start)
            log.info("resumed from %s at iteration %d", resume_path, start)
        else:
            log.warning("ignoring %s: it was made with another configuration", resume_path)
    log.info("FoB: %d trainable parameters, %d volumes, %d pairs, from iteration %d to %d",
             count_parameters(model), len(volumes), sum(len(v.pairs) for v in volumes), start, args.iterations)

    weights = LossWeights(lambda_heat=args.lambda_heat, lambda_coor=args.lambda_coor, coor_loss=args.coor_loss,
                          heat_loss=args.heat_loss)
    model.train()
    t0 = time.perf_counter() - train_seconds
    acc: dict[str, list] = {}
    if heldback and start == 0:  # the untrained network (matching prior only) as the first point
        hb = heldback_errors(model, heldback, cache, args.eval_episodes)
        rows.append({"iteration": 0, "seconds": 0.0, "lr": args.lr, **{"hb_" + k: v for k, v in hb.items()}})
        _log_heldback(0, hb)
        t0 = time.perf_counter()
    for it in range(start, args.iterations):
        ep = sampler.sample()
        o = model(ep.support_emb, ep.support_mask, ep.support_points, ep.query_emb)
        losses = fob_losses(o, ep, cfg, weights)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        ec, er = point_error(o, ep)
        for k, v in losses.items():
            acc.setdefault(k, []).append(float(v.detach()))
        acc.setdefault("err_coarse", []).append(ec)
        acc.setdefault("err_refined", []).append(er)
        if (it + 1) % 20 == 0 or it + 1 == args.iterations:
            row = {"iteration": it + 1, "seconds": round(time.perf_counter() - t0, 1), "lr": sched.get_last_lr()[0]}
            row.update({k: float(np.mean(v)) for k, v in acc.items()})
            if heldback and ((it + 1) % args.eval_every == 0 or it + 1 == args.iterations):
                t_eval = time.perf_counter()
                hb = heldback_errors(model, heldback, cache, args.eval_episodes)
                row.update({"hb_" + k: v for k, v in hb.items()})
                t0 += time.perf_counter() - t_eval  # evaluation time is not training time
                _log_heldback(it + 1, hb)
            rows.append(row)
            acc = {}
            if (it + 1) % 100 == 0:
                log.info("it %d  %.0fs  total %.3f rac %.3f heat %.2e coor %.1f fore %.3f  err %.1f/%.1f px",
                         it + 1, row["seconds"], row["total"], row["rac"], row["heat"], row["coor"], row["fore"],
                         row["err_coarse"], row["err_refined"])
        if (it + 1) % args.checkpoint_every == 0 or it + 1 == args.iterations:
            _atomic_save({"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "iteration": it + 1, "rows": rows,
                          "train_seconds": time.perf_counter() - t0}, resume_path)
            if it + 1 < args.iterations:  # the last iteration's log and plot are written below
                _write_log(rows, log_path)
                plot_losses(rows, png_path, weights)
    train_seconds = time.perf_counter() - t0
    _write_log(rows, log_path)
    plot_losses(rows, png_path, weights)

    t_cal = time.perf_counter()
    calib = calibrate(model, sampler, args.calibration_episodes)
    log.info("calibration: %s", json.dumps(calib))
    state = {"config": cfg.to_dict(), "state_dict": model.state_dict(), "calibration": calib}
    _atomic_save(state, out)
    meta = {
        "format": "fewshotsam-fob-1",
        "weights": out.name,
        "sha256": sha256_of(out),
        "sam_backend": backend.name,
        "config": cfg.to_dict(),
        "calibration": calib,
        "iterations": int(args.iterations),
        "lr": args.lr, "lr_decay_per_1k": args.decay, "seed": args.seed, "max_gap": args.max_gap,
        "loss_weights": {"lambda_heat": weights.lambda_heat, "lambda_coor": weights.lambda_coor,
                         "coor_loss": weights.coor_loss, "heat_loss": weights.heat_loss,
                         "temperature": weights.temperature},
        "heldback": {"volumes": [v.name for v in heldback], "episodes": int(args.eval_episodes),
                     "final": {k[3:]: r[k] for r in rows[-1:] for k in r if k.startswith("hb_")}} if heldback else None,
        "augment": not args.no_augment,
        "exclude_labels": list(args.exclude_labels),
        "fold": args.fold,
        "data": used,
        "episode_pairs": int(sum(len(v.pairs) for v in volumes)),
        "parameters": count_parameters(model),
        "train_seconds": round(train_seconds, 1),
        "prepare_seconds": round(prep_seconds, 1),
        "calibration_seconds": round(time.perf_counter() - t_cal, 1),
        "threads": int(args.threads),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python tools/lab.py train-fob " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train-fob"] else sys.argv[1:]),
        "final_losses": rows[-1] if rows else None,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=1))
    log.info("wrote %s (%.1f min training)", out, train_seconds / 60)
    return 0


def _write_log(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)

