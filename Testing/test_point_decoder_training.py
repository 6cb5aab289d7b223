"""The training of the point-aware LiteMedSAM decoder (``python tools/lab.py train-point-decoder``,
tools/fewshotsam_lab/point_decoder.py): its batched decoder and prompt tokens are the inference path's
arithmetic, the prompts it simulates are what they claim, and a training step changes only the decoder
side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.prompts.base import Prompts
from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend, build_litemedsam_model
from FewShotSAMLib.sam.prompt_embedding import SparsePromptEmbedding


@pytest.fixture(scope="module")
def T():
    from fewshotsam_lab import point_decoder

    return point_decoder


@pytest.fixture(scope="module")
def torch_backend():
    """The embedded LiteMedSAM with PyTorch's decoder (the reference arithmetic)."""
    return LiteMedSAMBackend(device="cpu", runtime="torch", decoder_runtime="torch", precision="fp32")


def square(size=256, r0=80, r1=160, c0=60, c1=150) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_tokens_match_the_inference_embedding(T, torch_backend):
    enc = torch_backend.model.prompt_encoder
    ref = SparsePromptEmbedding(enc)
    points = [(100, 120), (30, 40), (200, 10)]
    for box in (None, np.array([50, 60, 180, 200], np.float32)):
        s = T.PromptSet(list(points), [1, 0, 1], box, 0, None, None)
        with torch.no_grad():
            tokens = T.tokens_of(enc, [s])[0].numpy()
        xy = np.array([(c, r) for r, c in points], np.float32)
        expected = ref(xy, np.array([1, 0, 1]), box)
        assert tokens.shape == expected.shape
        np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_batched_decoder_matches_backend_decode(T, torch_backend):
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    sets = [T.PromptSet([(100, 120), (30, 40)], [1, 0], np.array([50, 60, 180, 200], np.float32), 0, None, None),
            T.PromptSet([(10, 20), (200, 40)], [1, 1], np.array([5, 6, 80, 90], np.float32), 0, None, None)]
    with torch.no_grad():
        logits, iou = T.decode_batch(torch_backend.model, emb, T.tokens_of(torch_backend.model.prompt_encoder, sets))
    for i, s in enumerate(sets):
        pts, lab = np.array(s.points, np.float32), np.array(s.labels)
        box = np.array([s.box[1], s.box[0], s.box[3], s.box[2]])  # (x0, y0, x1, y1) -> (r0, c0, r1, c1)
        res = torch_backend.decode(emb[i], Prompts(pts[lab == 1], pts[lab == 0], box))
        np.testing.assert_allclose(logits[i].numpy(), res.logits, atol=1e-3)
        assert abs(float(iou[i]) - res.score) < 1e-4


def test_batched_decoder_with_previous_answer_matches_backend_decode(T, torch_backend):
    """The training's mask input is the product's: previous_answer_logits through the prompt encoder."""
    from FewShotSAMLib.sam.litemedsam import previous_answer_logits

    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    previous = np.zeros((256, 256), bool)
    previous[60:160, 50:150] = True
    s = T.PromptSet([(100, 120), (70, 60)], [1, 0], np.array([50, 60, 180, 200], np.float32), 0, None, None)
    with torch.no_grad():
        logits, iou = T.decode_batch(torch_backend.model, emb, T.tokens_of(torch_backend.model.prompt_encoder, [s]),
                                     torch.from_numpy(previous_answer_logits(previous[None])))
        plain, _ = T.decode_batch(torch_backend.model, emb, T.tokens_of(torch_backend.model.prompt_encoder, [s]))
    pts, lab = np.array(s.points, np.float32), np.array(s.labels)
    box = np.array([s.box[1], s.box[0], s.box[3], s.box[2]])
    res = torch_backend.decode(emb[0], Prompts(pts[lab == 1], pts[lab == 0], box,
                                               mask_input=previous_answer_logits(previous)))
    np.testing.assert_allclose(logits[0].numpy(), res.logits, atol=1e-3)
    assert abs(float(iou[0]) - res.score) < 1e-4
    assert np.abs(logits - plain).max() > 1e-2  # the mask input is read


def test_an_empty_target_is_learnt_from_the_leak_it_removes(T):
    """A slice past the target's end: the loss is large while an answer remains and vanishes without it
    (a soft Dice of an empty target stays near 1 either way)."""
    valid = torch.ones(1, 256, 256)
    empty = torch.zeros(1, 256, 256)
    leak = torch.full((1, 256, 256), -10.0)
    leak[0, 100:120, 100:120] = 5.0
    assert float(T.seg_loss(leak, empty, valid)) > 2.0
    assert float(T.seg_loss(torch.full((1, 256, 256), -10.0), empty, valid)) < 0.1
    target = torch.zeros(1, 256, 256)
    target[0, 100:120, 100:120] = 1
    assert float(T.seg_loss(leak, target, valid)) < 0.05  # a non-empty target: cross-entropy + Dice as before


def test_prompt_sampling(T):
    rng = np.random.default_rng(0)
    target = square()
    valid = np.ones_like(target)
    box = T.jittered_box(target, rng)
    assert box[0] <= box[2] and box[1] <= box[3]
    assert abs(box[0] - 60) <= 8 and abs(box[3] - 159) <= 8  # within the jitter of the true box
    s = T.sample_prompt_set("points", target, valid, rng, clicks=2)
    assert s.box is None and s.labels == [1] and target[s.points[0]] and s.clicks == 2
    s = T.sample_prompt_set("ring", target, valid, rng, clicks=0, n_ring=6, n_fg=2)
    assert s.labels == [1, 1] + [0] * 6 and s.box is not None
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~target)
    assert all(target[p] for p in s.points[:2])
    assert all(3 < dist[p] <= 11 for p in s.points[2:])  # on the ring just outside the target
    ring_target = square()
    ring_target[100:120, 90:110] = False  # a hole
    assert T.hole_points(ring_target) and all(not ring_target[p] and 100 <= p[0] < 120 for p in T.hole_points(ring_target))


def test_training_step_updates_only_the_decoder_side(T):
    torch.manual_seed(0)
    model = build_litemedsam_model()
    model.image_encoder = torch.nn.Identity()
    reference = build_litemedsam_model()
    reference.image_encoder = torch.nn.Identity()
    reference.load_state_dict(model.state_dict())
    params = T.trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(T.TRAINED_PREFIXES) for n in names)
    assert any(n.startswith("prompt_encoder.mask_downscaling") for n in names)  # reads the previous answer
    assert not any(n.startswith(("prompt_encoder.pe_layer", "prompt_encoder.no_mask_embed")) for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    target = square()
    holed = square(r0=20, r1=70, c0=150, c1=230)
    holed[35:50, 180:200] = False
    valid = np.ones((256, 256), bool)
    data = [T.SliceTargets(f"s{i}", (torch.randn(256, 64, 64) * 0.3).half(), valid, [target, holed], i % 2 == 0)
            for i in range(3)]
    seen = set()
    for _ in range(40):  # until a box-only step and an interactive step with the previous answer ran
        row = T.train_step(model, reference, opt, data, rng, batch=2)
        seen.add(row["mode"])
        seen.add("previous" if row["previous"] else "no previous")
        assert np.isfinite(row["loss"])
        if seen >= {"box", "previous"}:
            break
    assert seen >= {"box", "previous"}
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(T.TRAINED_PREFIXES) for k in changed)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())  # the reference untouched


def test_export_writes_weights_with_digest_and_metadata(T, tmp_path):
    model = build_litemedsam_model()
    state = T.trained_state(model)
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"trained": state, "optimizer": {}, "step": 3, "rows": [{"loss": 1.0}] * 3, "rng": None,
                "args": {"batch": 8, "lr": 1e-4, "steps": 3, "seed": 0, "chaos": "x", "totalseg": "y"}},
               work / "checkpoint.pt")
    out = tmp_path / "pkg" / "litemedsam_points.pt"
    from fewshotsam_lab.cli import main

    assert main(["train-point-decoder", "--work", str(work), "--output", str(out), "--export"]) == 0
    import json

    from FewShotSAMLib.sam.weights import sha256_of

    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_of(out) and meta["steps"] == 3 and "command" in meta
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(state) and all(v.dtype == torch.float16 for v in loaded.values() if v.is_floating_point())
