"""Fine-tune LiteMedSAM's prompt encoder and mask decoder so that they follow points (the image encoder is
frozen; its embeddings come from the persistent cache). The result ships as the ``litemedsam-points``
backend (FewShotSAMLib/sam/checkpoints/); docs/POINTS.md has the figures and what was tried.

Prompts are simulated the way they reach SAM in this product:
- ``box``: a (jittered) box alone; its target is the label mask, or, on self-supervised superpixel targets,
  the original LiteMedSAM's own answer to that box (so box answers stay what they were);
- ``box+clicks``: a box, then 1-3 corrective clicks (``clicks.py``: the most interior pixel of the largest
  error region), the first against the embedded LiteMedSAM's box answer (what ``litemedsam-points``
  shows before any click), each next one against the previous answer, every answer in the loss (SAM's
  and RITM's interactive training, unrolled);
- ``points``: one foreground point inside the target, then 0-3 corrective clicks (no box);
- ``ring``: a box, foreground points inside and background points on a ring just outside the target
  (what FoB produces), and a background point in a hole of the target;
- ``remove``: a box with 1-2 background clicks on its answer and an empty target (a slice past the
  target's end, where the user's background click removes what propagation left).

Masks to learn from, none of them a label that a reported figure is measured on:
- superpixels (Felzenszwalb, on each model-frame slice) of the CHAOS images: self-supervised, no label read;
- the TotalSegmentator example CT's labels except the vertebrae 30-32 (the click benchmark's CT targets),
  sliced along all three axes (3 mm isotropic).

Run from the repository root (resumable: a checkpoint every ``--save-every`` steps in ``--work``):

    python tools/lab.py train-point-decoder --minutes 70
    python tools/lab.py train-point-decoder --export      # writes the shipped weights and their metadata
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from FewShotSAMLib.clicks import corrective_click, interior_point

from FewShotSAMLib.sam.litemedsam import previous_answer_logits

from . import datasets

ROOT = datasets.REPO_ROOT

log = logging.getLogger("train_point_decoder")

EXCLUDED_TOTALSEG_LABELS = (30, 31, 32)  # the vertebrae the click benchmark and the hole test measure on
MODES = ("box", "box+clicks", "points", "ring", "remove")
MODE_WEIGHTS = (0.1, 0.4, 0.15, 0.2, 0.15)
PREVIOUS_SHARE = 0.75  # share of interactive prompt sets whose decodes after a click see the previous answer
TRAINED_PREFIXES = ("mask_decoder.", "prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.",
                    "prompt_encoder.mask_downscaling.")


# ----------------------------------------------------------------------------------------------------
# Training data: (embedding, target mask) pairs in the 256 x 256 model frame
# ----------------------------------------------------------------------------------------------------
@dataclass
class SliceTargets:
    """One slice: its cached embedding (float16, (C, 64, 64)), valid pixels and candidate target masks."""

    name: str
    embedding: torch.Tensor
    valid: np.ndarray
    targets: list  # bool (S, S) masks
    distill: bool  # True: box-only answers are taught from the original model (self-supervised targets)


def superpixel_targets(frame: np.ndarray, valid: np.ndarray, *, scale: float, min_area: int = 150,
                       max_fraction: float = 0.3) -> list[np.ndarray]:
    """Felzenszwalb superpixels of one model-frame slice (values in [0, 1]) inside the body, kept when
    between ``min_area`` pixels and ``max_fraction`` of the body, filled, and not touching the padding."""
    from skimage.segmentation import felzenszwalb

    body = valid & (ndimage.uniform_filter(frame, 5) > 0.05)
    if body.sum() < 1000:
        return []
    seg = felzenszwalb(frame, scale=scale, sigma=0.8, min_size=min_area)
    out = []
    edge = ~ndimage.binary_erosion(valid, iterations=2)
    for lab in np.unique(seg[body]):
        m = (seg == lab) & body
        area = int(m.sum())
        if area < min_area or area > max_fraction * body.sum() or (m & edge).any():
            continue
        m = ndimage.binary_opening(m, iterations=1)
        labels, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        m = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
        if m.sum() >= min_area:
            out.append(m)
    return out


def load_chaos(data: Path, backend, cache, scales: Sequence[float] = (150.0, 500.0)) -> list[SliceTargets]:
    """Superpixel targets of every CHAOS image (labels are never read)."""
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity, read_volume

    out = []
    images = [img for _, img, _ in datasets.list_cases(data, labels=False)]
    for img in images:
        vol = read_volume(img)
        pv = PreparedVolume(vol.array, vol.spacing, 0, choose_intensity(vol.array, vol.metadata), backend.input_size)
        embs = pv.embeddings(cache, range(pv.n_slices))
        for z in range(pv.n_slices):
            frame = pv.model_slice(z)
            targets = [t for s in scales for t in superpixel_targets(frame, pv.valid, scale=s)]
            if targets:
                out.append(SliceTargets(f"{img.name}:{z}", embs[z].to(torch.float16), pv.valid, targets, True))
        log.info("%s: %d slices with superpixel targets", img.name, sum(o.name.startswith(img.name) for o in out))
    return out


def load_totalseg(image: Path, label: Path, backend, cache, excluded: Sequence[int] = EXCLUDED_TOTALSEG_LABELS,
                  min_area: int = 40) -> list[SliceTargets]:
    """The TotalSegmentator example's labelled structures (minus ``excluded``) on slices along all three axes."""
    from FewShotSAMLib.slices import PreparedVolume
    from FewShotSAMLib.volume import choose_intensity, label_on_image_grid, read_volume

    vol = read_volume(image)
    lab = label_on_image_grid(vol, read_volume(label, "label map")).astype(np.int32)
    lab[np.isin(lab, list(excluded))] = 0
    out = []
    for axis in range(3):
        pv = PreparedVolume(vol.array, vol.spacing, axis, choose_intensity(vol.array, vol.metadata), backend.input_size)
        lab_sl = np.moveaxis(lab, axis, 0)
        keep = [z for z in range(pv.n_slices) if lab_sl[z].any()]
        embs = pv.embeddings(cache, keep)
        for z, emb in zip(keep, embs):
            targets = []
            for v in np.unique(lab_sl[z]):
                if v == 0:
                    continue
                m = pv.mask_to_model(lab_sl[z] == v)
                if m.sum() >= min_area:
                    targets.append(m)
            if targets:
                out.append(SliceTargets(f"{image.name}:axis{axis}:{z}", emb.to(torch.float16), pv.valid, targets,
                                        False))
    log.info("%s: %d slices with label targets", image.name, len(out))
    return out


# ----------------------------------------------------------------------------------------------------
# The differentiable decoder (batched: one prompt set per image)
# ----------------------------------------------------------------------------------------------------
PAD, BG, FG, CORNER0, CORNER1 = -1, 0, 1, 2, 3


def sparse_tokens(prompt_encoder: torch.nn.Module, coords: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """SAM's sparse prompt tokens in PyTorch (differentiable in the learnt kind vectors): ``coords``
    (B, T, 2) (x, y) input-frame pixels, ``kinds`` (B, T) in {PAD, BG, FG, CORNER0, CORNER1}. The same
    arithmetic as sam/prompt_embedding.py (pixel centres +0.5, Fourier features, kind vector added; a
    padding token is the "not a point" vector alone)."""
    h, w = prompt_encoder.input_image_size
    xy = (coords + 0.5) / torch.tensor([w, h], dtype=coords.dtype)
    pe = prompt_encoder.pe_layer._pe_encoding(xy)  # (B, T, C)
    kind_vectors = torch.stack([m.weight[0] for m in prompt_encoder.point_embeddings])  # (4, C)
    out = pe + kind_vectors[kinds.clamp(min=0)]
    pad = (kinds == PAD)[..., None]
    return torch.where(pad, prompt_encoder.not_a_point_embed.weight[0].expand_as(out), out)


def decode_batch(model: torch.nn.Module, emb: torch.Tensor, tokens: torch.Tensor,
                 previous: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first mask token's low-res logits (B, 256, 256) and predicted IoU (B,) for B images, each with
    its own prompt tokens (B, T, C); SAM's ``predict_masks`` without its repeat over prompts. ``previous``
    (B, 256, 256) is the mask input (``previous_answer_logits`` of the answer being corrected); None: the
    "no mask" vector."""
    d, pe_enc = model.mask_decoder, model.prompt_encoder
    b = emb.shape[0]
    out_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], 0)[None].expand(b, -1, -1)
    all_tokens = torch.cat([out_tokens, tokens], 1)
    if previous is None:
        src = emb + pe_enc.no_mask_embed.weight.reshape(1, -1, 1, 1)
    else:
        src = emb + pe_enc.mask_downscaling(previous[:, None])
    hs, src = d.transformer(src, pe_enc.get_dense_pe(), all_tokens)
    c, hh, ww = emb.shape[1:]
    src = src.transpose(1, 2).reshape(b, c, hh, ww)
    up = d.output_upscaling(src)
    hyper = d.output_hypernetworks_mlps[0](hs[:, 1])  # (B, C')
    masks = (hyper[:, None] @ up.flatten(2)).reshape(b, up.shape[-2], up.shape[-1])
    iou = d.iou_prediction_head(hs[:, 0])[:, 0]
    return masks, iou


# ----------------------------------------------------------------------------------------------------
# Prompt sampling
# ----------------------------------------------------------------------------------------------------
def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1, max_px: float = 8.0) -> np.ndarray:
    """(x0, y0, x1, y1) of ``mask`` with each side moved by up to ``jitter`` of the box size (``max_px``
    at most), as boxes from a neighbouring slice or a user's drag are never exact."""
    rows, cols = np.nonzero(mask)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32) + 1
    shift = rng.uniform(-1, 1, 4) * np.minimum(jitter * size, max_px)
    box = np.clip(box + shift, 0, mask.shape[0] - 1)
    return np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])], np.float32)


def random_inside(region: np.ndarray, rng: np.random.Generator, interior: bool = True) -> Optional[tuple[int, int]]:
    """A random pixel of ``region`` (preferring pixels at least 2 px inside it); None when empty."""
    core = ndimage.binary_erosion(region, iterations=2) if interior else region
    if not core.any():
        core = region
    rows, cols = np.nonzero(core)
    if not len(rows):
        return None
    i = int(rng.integers(len(rows)))
    return int(rows[i]), int(cols[i])


def ring_points(mask: np.ndarray, valid: np.ndarray, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """``n`` random pixels on a ring 3-10 px outside ``mask`` (inside ``valid``)."""
    outer = ndimage.binary_dilation(mask, iterations=int(rng.integers(6, 11)))
    inner = ndimage.binary_dilation(mask, iterations=3)
    ring = outer & ~inner & valid
    rows, cols = np.nonzero(ring)
    if not len(rows):
        return []
    idx = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return [(int(rows[i]), int(cols[i])) for i in idx]


def hole_points(mask: np.ndarray, min_area: int = 6) -> list[tuple[int, int]]:
    """The most interior pixel of each hole (enclosed background) of ``mask`` of at least ``min_area`` px."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    return [interior_point(labels == k) for k in range(1, n + 1) if (labels == k).sum() >= min_area]


@dataclass
class PromptSet:
    """One simulated prompt set in the model frame: points (row, col) with labels 1/0, optional box (x0, y0,
    x1, y1); ``clicks`` corrective clicks still to be simulated with the model; ``target`` the mask to learn
    (bool), ``soft`` an optional soft target (the original model's probabilities)."""

    points: list
    labels: list
    box: Optional[np.ndarray]
    clicks: int
    target: np.ndarray
    valid: np.ndarray
    soft: Optional[np.ndarray] = None


def sample_prompt_set(mode: str, target: np.ndarray, valid: np.ndarray, rng: np.random.Generator,
                      clicks: int, n_ring: int = 0, n_fg: int = 1) -> PromptSet:
    """The initial prompts of ``mode`` for ``target`` (corrective clicks come later, from the model)."""
    if mode == "box":
        return PromptSet([], [], jittered_box(target, rng), 0, target, valid)
    if mode == "box+clicks":
        return PromptSet([], [], jittered_box(target, rng), clicks, target, valid)
    if mode == "points":
        p = interior_point(target) if rng.random() < 0.5 else random_inside(target, rng)
        return PromptSet([p], [1], None, clicks, target, valid)
    if mode == "ring":
        pts, labels = [], []
        for _ in range(n_fg):
            p = random_inside(target, rng)
            pts.append(p)
            labels.append(1)
        ring = ring_points(target, valid, rng, n_ring)
        ring += [ring[-1] if ring else (0, 0)] * (n_ring - len(ring))  # one layout for the whole batch
        pts += ring
        labels += [0] * len(ring)
        return PromptSet(pts, labels, jittered_box(target, rng, jitter=0.05), 0, target, valid)
    raise ValueError(mode)


def tokens_of(prompt_encoder: torch.nn.Module, sets: Sequence[PromptSet]) -> torch.Tensor:
    """The (B, T, C) sparse tokens of prompt sets of one layout (same number of points; all with or all
    without a box), as at inference: points, then the two box corners or one padding token."""
    coords, kinds = [], []
    for s in sets:
        xy = [(c, r) for r, c in s.points]
        k = list(s.labels)
        if s.box is not None:
            xy += [(s.box[0], s.box[1]), (s.box[2], s.box[3])]
            k += [CORNER0, CORNER1]
        else:
            xy.append((0.0, 0.0))
            k.append(PAD)
        coords.append(xy)
        kinds.append(k)
    return sparse_tokens(prompt_encoder, torch.tensor(coords, dtype=torch.float32), torch.tensor(kinds))


def add_corrective_clicks(sets: list[PromptSet], predictions: np.ndarray) -> None:
    """One corrective click per prompt set against its target, given the current predictions (bool (B, S, S))."""
    for s, pred in zip(sets, predictions):
        click = corrective_click(pred, s.target, s.valid)
        if click is None:  # exact already: repeat the interior foreground point (or a corner, target empty)
            point, fg = (interior_point(s.target), True) if s.target.any() else ((0, 0), False)
        else:
            point, fg = click.point, click.foreground
        s.points.append(point)
        s.labels.append(1 if fg else 0)


EMPTY_MIN_AREA = 64.0  # pixels: the floor of an empty target's loss normaliser


def seg_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-item binary cross-entropy plus soft Dice over the valid pixels (targets may be soft).

    An empty target (a slice past the target's end) has no Dice gradient worth the name (1 - 1 / (S + 1)
    for a predicted mass S), and its cross-entropy averaged over the image weighs a leak of a few hundred
    pixels at a few hundredths: its loss is instead the cross-entropy summed and divided by the predicted
    mass (at least EMPTY_MIN_AREA px), as strong per pixel as the Dice of a target of that size."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * valid
    p = torch.sigmoid(logits) * valid
    t = targets * valid
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    full = bce.sum((1, 2)) / valid.sum((1, 2)) + dice
    empty = bce.sum((1, 2)) / p.sum((1, 2)).detach().clamp(min=EMPTY_MIN_AREA)
    return torch.where(t.sum((1, 2)) > 0, full, empty)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def trained_state(model: torch.nn.Module) -> dict:
    """The fine-tuned part of the model's state dict (mask decoder, point and padding vectors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze everything but the mask decoder and the point/padding vectors; return those."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_PREFIXES))
        if p.requires_grad:
            params.append(p)
    return params


def _round_loss(logits: torch.Tensor, iou: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segmentation loss, IoU-head loss, per-item hard intersection/union terms for logging)."""
    seg = seg_loss(logits, targets, valid).mean()
    with torch.no_grad():
        pred = (logits > 0).float() * valid
        hard = (targets > 0.5).float() * valid
        inter = (pred * hard).sum((1, 2))
        union = (pred + hard).clamp(max=1).sum((1, 2))
        true_iou = torch.where(union > 0, inter / union.clamp(min=1e-6), torch.ones_like(union))
    return seg, F.mse_loss(iou, true_iou), torch.stack([inter.sum(), pred.sum() + hard.sum()])


def train_step(model, reference, optimizer, data: Sequence[SliceTargets], rng: np.random.Generator,
               batch: int) -> dict:
    """One optimisation step on ``batch`` prompt sets of one randomly drawn mode; returns the loss terms.

    Interactive modes are unrolled as at inference: ``box+clicks`` and ``remove`` start from the embedded
    LiteMedSAM's box answer (what ``litemedsam-points`` gives for a box alone), ``points`` from one
    foreground point; each corrective click is placed against the previous answer (computed without
    gradient) and the answer after the last click is in the loss (RITM's iterative training)."""
    mode = MODES[int(rng.choice(len(MODES), p=MODE_WEIGHTS))]
    clicks = {"box+clicks": int(rng.integers(1, 4)), "points": int(rng.integers(0, 4)),
              "remove": int(rng.integers(1, 3))}.get(mode, 0)
    n_ring, n_fg = int(rng.integers(2, 9)), int(rng.integers(1, 4))
    items = [data[int(i)] for i in rng.integers(len(data), size=batch)]
    sets = []
    for it in items:
        target = it.targets[int(rng.integers(len(it.targets)))]
        s = sample_prompt_set("box+clicks" if mode == "remove" else mode, target, it.valid, rng, clicks, n_ring, n_fg)
        if mode == "ring":
            for p in hole_points(target)[:1]:  # a hole gets a background point (replacing a ring point)
                s.points[-1] = p
        if mode == "remove":  # a slice past the target's end: the user's background clicks remove the answer
            s.target = np.zeros_like(target)
        sets.append(s)
    emb = torch.stack([it.embedding for it in items]).float()
    valid = torch.from_numpy(np.stack([s.valid for s in sets]).astype(np.float32))
    model.train()
    with_previous = clicks > 0 and rng.random() < PREVIOUS_SHARE
    previous: Optional[np.ndarray] = None  # bool (B, S, S): the answer being corrected

    def forward():
        mask_input = torch.from_numpy(previous_answer_logits(previous)) if with_previous else None
        return decode_batch(model, emb, tokens_of(model.prompt_encoder, sets), mask_input)

    if mode in ("box", "ring") or (mode == "points" and clicks == 0):
        if mode == "box" and reference is not None:
            with torch.no_grad():
                ref, _ = decode_batch(reference, emb, tokens_of(reference.prompt_encoder, sets))
            for s, it, r in zip(sets, items, ref):
                if it.distill:
                    s.soft = torch.sigmoid(r).numpy()
    else:
        with torch.no_grad():
            first = model if mode == "points" or reference is None else reference
            previous = decode_batch(first, emb, tokens_of(first.prompt_encoder, sets))[0].numpy() > 0
            for _ in range(clicks - 1):
                add_corrective_clicks(sets, previous)
                previous = forward()[0].numpy() > 0
        add_corrective_clicks(sets, previous)
    logits, iou = forward()
    targets = torch.from_numpy(np.stack([s.soft if s.soft is not None else s.target.astype(np.float32) for s in sets]))
    seg, iou_loss, (inter, total) = _round_loss(logits, iou, targets, valid)
    loss = seg + iou_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    model.eval()
    return {"mode": mode, "clicks": clicks, "previous": with_previous, "loss": loss.item(), "seg": seg.item(), "iou": iou_loss.item(),
            "dice": float(2 * inter / total * 100) if total > 0 else 100.0}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def load_data(args) -> list[SliceTargets]:
    """Every training slice (embeddings from the persistent cache, encoded once when missing)."""
    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache

    backend = load_backend("litemedsam", "cpu")
    cache = EmbeddingCache(backend, cap_bytes=1 << 28, persist_dir=args.embeddings)
    data = []
    if args.chaos:
        data += load_chaos(Path(args.chaos), backend, cache)
    if args.totalseg:
        data += load_totalseg(*datasets.totalseg_ct(Path(args.totalseg)), backend, cache)
    if not data:
        raise SystemExit("no training data: pass --chaos and/or --totalseg folders that exist")
    return data


def train(args) -> int:
    """Train (or resume) from the work folder's checkpoint until ``--steps`` or ``--minutes``."""
    from FewShotSAMLib.sam.litemedsam import build_litemedsam_model
    from FewShotSAMLib.sam.weights import embedded_litemedsam_path, load_state_dict

    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    model = build_litemedsam_model()
    model.load_state_dict(load_state_dict(embedded_litemedsam_path()))
    model.image_encoder = torch.nn.Identity()  # never used here: embeddings are cached
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step, rows = 0, []
    rng = np.random.default_rng(args.seed)
    if args.init and not ckpt_path.exists():  # continue from shipped weights (float16 -> float32)
        init = torch.load(args.init, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in init.items()}, strict=False)
        log.info("initialised the trained parts from %s", args.init)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["trained"], strict=False)
        optimizer.load_state_dict(ck["optimizer"])
        step, rows = ck["step"], ck["rows"]
        rng.bit_generator.state = ck["rng"]
        log.info("resumed at step %d", step)
    if step >= args.steps:
        log.info("already trained for %d steps", step)
        return 0
    data_path = work / "data.pt"  # the training slices (superpixels take minutes): kept for resumed runs
    if data_path.exists():
        data = torch.load(data_path, map_location="cpu", weights_only=False)
    else:
        data = load_data(args)
        _atomic_save(data, data_path)
    log.info("%d training slices, %d targets", len(data), sum(len(d.targets) for d in data))
    model.eval()
    t_end = time.time() + args.minutes * 60
    t0 = time.time()
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, desc="point decoder", disable=args.quiet)
    while step < args.steps and time.time() < t_end:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        row = train_step(model, reference, optimizer, data, rng, args.batch)
        row["step"] = step
        rows.append(row)
        step += 1
        bar.update(1)
        if step % 20 == 0:
            recent = rows[-20:]
            bar.set_postfix(loss=f"{np.mean([r['loss'] for r in recent]):.3f}",
                            dice=f"{np.mean([r['dice'] for r in recent]):.1f}")
        if step % args.save_every == 0 or step == args.steps:
            _atomic_save({"trained": trained_state(model), "optimizer": optimizer.state_dict(), "step": step,
                          "rows": rows, "rng": rng.bit_generator.state, "args": vars(args)}, ckpt_path)
    bar.close()
    _atomic_save({"trained": trained_state(model), "optimizer": optimizer.state_dict(), "step": step,
                  "rows": rows, "rng": rng.bit_generator.state, "args": vars(args)}, ckpt_path)
    log.info("stopped at step %d of %d after %.1f min", step, args.steps, (time.time() - t0) / 60)
    return 0


def export(args) -> int:
    """Write the shipped weights (float16) and their metadata from the work folder's checkpoint."""
    from FewShotSAMLib.sam.weights import sha256_of

    ck = torch.load(Path(args.work) / "checkpoint.pt", map_location="cpu", weights_only=False)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ck["trained"].items()}
    a = ck["args"]
    init = Path(a["init"]) if a.get("init") else None
    # the weights a run continued from (often the file this export replaces): their digest, read first
    init_sha = a.get("init_sha256") or (sha256_of(init) if init is not None and init.is_file() else None)
    _atomic_save(state, out)
    rows = ck["rows"]

    def rel(path: str) -> str:
        return os.path.relpath(path, ROOT) if path else path

    files = []
    if a.get("chaos") and Path(a["chaos"]).is_dir():
        files += [f"{rel(a['chaos'])}/{p.name} (image only)" for p in sorted(Path(a["chaos"]).glob("image_*.nii.gz"))]
    if a.get("totalseg"):
        files += [f"{rel(a['totalseg'])}/{datasets.TOTALSEG_CT}", f"{rel(a['totalseg'])}/{datasets.TOTALSEG_LABELS}"]
    meta = {
        "what": "LiteMedSAM prompt encoder point vectors + mask decoder fine-tuned to follow points "
                "(image encoder: the embedded LiteMedSAM's, unchanged)",
        "file": out.name, "sha256": sha256_of(out), "bytes": out.stat().st_size,
        "steps": ck["step"], "batch": ck["args"]["batch"], "lr": ck["args"]["lr"],
        "data": {"targets": "Felzenszwalb superpixels of the CHAOS T2 images (no CHAOS label read); the "
                            "TotalSegmentator example CT's labels on slices along all three axes, except "
                            f"{list(EXCLUDED_TOTALSEG_LABELS)}",
                 "files": files},
        "modes": dict(zip(MODES, MODE_WEIGHTS)),
        "init_sha256": init_sha,
        "previous_answer": {"share": PREVIOUS_SHARE, "logit": float(previous_answer_logits(np.ones((1, 1), bool))[0, 0])},
        "command": "python tools/lab.py train-point-decoder " + " ".join(
            f"--{k} {rel(v) if k in ('chaos', 'totalseg', 'init') else v}" for k, v in a.items()
            if k in ("steps", "batch", "lr", "seed", "chaos", "totalseg", "init") and v is not None),
        "final_loss_mean_last_200": round(float(np.mean([r["loss"] for r in rows[-200:]])), 4),
        "date": datetime.date.today().isoformat(),
    }
    Path(str(out.with_suffix(".json"))).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("wrote %s (%d bytes) and its metadata", out, out.stat().st_size)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``train-point-decoder`` command."""
    p.add_argument("--chaos", default=str(datasets.chaos_dir()), help="CHAOS images (labels unused)")
    p.add_argument("--totalseg", default=str(datasets.totalseg_dir()), help="TotalSegmentator example folder")
    p.add_argument("--embeddings", default=str(ROOT / ".cache/embeddings"), help="persistent embedding cache")
    p.add_argument("--work", default=str(ROOT / ".cache/point_decoder"), help="checkpoints and logs (resumable)")
    p.add_argument("--output", default=str(ROOT / "FewShotSAMLib/sam/checkpoints/litemedsam_points.pt"))
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--minutes", type=float, default=115.0, help="stop (resumably) after this long")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from these decoder weights (e.g. shipped ones)")
    p.add_argument("--export", action="store_true", help="write the shipped weights from the checkpoint")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Train, or with ``--export`` write the shipped weights."""
    return export(args) if args.export else train(args)
