"""The embedding cache: encode-once, batching, LRU memory cap with disk spill, persistence, clean-up.

Most tests use a small real backend (a SamBackend around a tiny randomly initialised conv encoder that
counts its calls), because they are about the cache, not about SAM. The last test runs the real default
backend (LiteMedSAM with its embedded weights) once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from FewShotSAMLib.prompts.base import Prompts
from FewShotSAMLib.sam.backend import SamBackend
from FewShotSAMLib.sam.cache import EmbeddingCache, key_digest
from FewShotSAMLib.slices import PreparedVolume
from FewShotSAMLib.volume import Intensity

S = 32  # model-frame size of the tiny backend
EMB_SHAPE = (8, 8, 8)
EMB_BYTES = int(np.prod(EMB_SHAPE)) * 2  # float16


class CountingEncoder(torch.nn.Module):
    """A real two-layer conv net (3x32x32 -> 8x8x8) that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.GELU(),
                                       torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.net(x)


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = CountingEncoder()


class TinyBackend(SamBackend):
    name = "tiny-test"
    input_size = S
    batch_size = 3

    def __init__(self) -> None:
        super().__init__(TinyModel(), "cpu")

    @property
    def batches(self) -> list[int]:
        return self.model.image_encoder.batches

    @property
    def n_encoded(self) -> int:
        return sum(self.batches)


def frames_by_key(key) -> np.ndarray:
    """Deterministic, distinct (S, S) frame in [0, 1] for each integer key."""
    return np.random.default_rng(int(key) + 100).random((S, S), dtype=np.float32)


def expected(backend: TinyBackend, key) -> np.ndarray:
    """The encoder's output for ``key`` computed outside the cache (float32; batched convolutions may
    differ from it in the last bits, so compare with ``assert_close_to``)."""
    with torch.inference_mode():
        x = backend._normalise(torch.from_numpy(frames_by_key(key))[None])
        return backend.model.image_encoder.net(x)[0].numpy()


def assert_close_to(emb: torch.Tensor, reference: np.ndarray) -> None:
    """``emb`` equals ``reference`` up to float16 rounding."""
    np.testing.assert_allclose(emb.numpy(), reference, rtol=2e-3, atol=2e-3)


def f16_bytes(emb: torch.Tensor) -> bytes:
    return emb.numpy().astype(np.float16).tobytes()


def test_each_key_is_encoded_once_across_the_api():
    backend = TinyBackend()
    cache = EmbeddingCache(backend)
    cache.ensure([0, 1, 2, 1, 0], frames_by_key)
    assert backend.n_encoded == 3 and cache.encoded == 3
    many = cache.get_many([1, 2, 3, 4], frames_by_key)
    assert backend.n_encoded == 5
    one = cache.get(5, frames_by_key)
    assert backend.n_encoded == 6
    again = cache.get(3)  # cached: no frame needed
    cache.ensure(range(6), frames_by_key)
    cache.get_many(range(6), frames_by_key)
    assert backend.n_encoded == 6 and cache.encoded == 6
    assert one.shape == EMB_SHAPE and one.dtype == torch.float32
    assert_close_to(many[2], expected(backend, 3))
    torch.testing.assert_close(again, many[2], rtol=0, atol=0)
    with pytest.raises(KeyError):
        cache.get(99)  # not cached and no frame to encode it from
    cache.close()


def test_two_segment_like_passes_encode_each_slice_once():
    """Two passes over a prepared volume, reading ahead in batches as the engine does, from two
    different painted slices: every slice reaches the encoder exactly once."""
    backend = TinyBackend()
    cache = EmbeddingCache(backend)
    rng = np.random.default_rng(3)
    image = rng.normal(100, 20, size=(12, 20, 24)).astype(np.float32)
    pv = PreparedVolume(image, (2.0, 1.0, 1.0), 0, Intensity("percentile", 40.0, 160.0), S)
    frames_seen: list[int] = []
    original = pv.frame_for_key

    def counting_frame(key):
        frames_seen.append(key[2])
        return original(key)

    pv.frame_for_key = counting_frame
    for painted in (5, 8):
        pv.embeddings(cache, [painted])
        for step in (1, -1):
            stop = pv.n_slices if step == 1 else -1
            for q in range(painted + step, stop, step):
                if pv.key(q) not in cache:  # a block along the run, as the engine encodes for PyTorch
                    pv.embeddings(cache, list(range(q, stop, step))[: backend.batch_size])
                emb = cache.get(pv.key(q))
                assert emb.shape == EMB_SHAPE
    assert backend.n_encoded == pv.n_slices == 12
    assert sorted(frames_seen) == list(range(12))


def test_batches_respect_batch_size():
    backend = TinyBackend()
    cache = EmbeddingCache(backend)
    progress: list[int] = []
    cache.ensure(list(range(7)), frames_by_key, on_encoded=progress.append)
    assert backend.batches == [3, 3, 1] and progress == [3, 3, 1]
    backend.batch_size = 2
    cache.ensure(list(range(12)), frames_by_key, on_encoded=progress.append)
    assert backend.batches == [3, 3, 1, 2, 2, 1]
    cache.close()


def test_memory_cap_spills_to_disk_and_reads_back_bit_identical():
    backend = TinyBackend()
    cap = int(3.5 * EMB_BYTES)  # room for three embeddings
    cache = EmbeddingCache(backend, cap_bytes=cap)
    first = {}
    for k in range(10):
        first[k] = f16_bytes(cache.get(k, frames_by_key))
        assert cache.memory_bytes <= cap
    assert cache.memory_bytes == 3 * EMB_BYTES
    assert cache.spilled == 7
    spill = cache._spill
    assert spill is not None and len(list(spill.glob("*.npy"))) == 7
    # the least recently used went out first: 0..6 are on disk, 7..9 in memory
    assert sorted(p.stem for p in spill.glob("*.npy")) == sorted(key_digest(k) for k in range(7))
    encoded_before = backend.n_encoded
    for k in (0, 4, 9, 2):
        got = cache.get(k)
        assert f16_bytes(got) == first[k]  # bit-identical float16 after the round trip through disk
        assert_close_to(got, expected(backend, k))
        assert cache.memory_bytes <= cap
    assert backend.n_encoded == encoded_before == 10
    # recently used entries stay: touching 2 then adding two new keys keeps 2 in memory
    cache.get(2)
    cache.get(10, frames_by_key)
    cache.get(11, frames_by_key)
    assert 2 in cache._mem and cache.memory_bytes <= cap
    cache.close()


def test_cap_from_the_options_and_the_environment(monkeypatch):
    from FewShotSAMLib.errors import UserInputError
    from FewShotSAMLib.options import DEFAULT_CAP_BYTES, RuntimeOptions

    cap_env = "FEWSHOTSAM_CACHE_CAP_MB"
    monkeypatch.delenv(cap_env, raising=False)
    assert EmbeddingCache(TinyBackend()).cap_bytes == DEFAULT_CAP_BYTES == 512 << 20
    assert EmbeddingCache(TinyBackend(), options=RuntimeOptions(embedding_cap_bytes=3 << 20)).cap_bytes == 3 << 20
    monkeypatch.setenv(cap_env, "64")
    assert EmbeddingCache(TinyBackend()).cap_bytes == 64 << 20  # no options given: the environment's
    assert EmbeddingCache(TinyBackend(), cap_bytes=1000).cap_bytes == 1000  # an explicit cap wins
    assert EmbeddingCache(TinyBackend(), options=RuntimeOptions()).cap_bytes == DEFAULT_CAP_BYTES  # given options win
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv(cap_env, bad)
        with pytest.raises(UserInputError, match=cap_env):
            EmbeddingCache(TinyBackend())


def test_persist_dir_serves_a_second_cache(tmp_path):
    first = TinyBackend()
    cache1 = EmbeddingCache(first, persist_dir=tmp_path)
    cache1.ensure(list(range(5)), frames_by_key)
    originals = [f16_bytes(e) for e in cache1.get_many(list(range(5)), frames_by_key)]
    assert first.n_encoded == 5
    assert len(list((tmp_path / TinyBackend.name).glob("*.npy"))) == 5
    cache1.close()
    assert len(list((tmp_path / TinyBackend.name).glob("*.npy"))) == 5  # close keeps persistent files

    second = TinyBackend()
    cache2 = EmbeddingCache(second, cap_bytes=2 * EMB_BYTES, persist_dir=tmp_path)
    assert all(k in cache2 for k in range(5))
    cache2.ensure(list(range(5)), frames_by_key)
    embs = cache2.get_many(list(range(5)), frames_by_key)
    assert second.n_encoded == 0 and cache2.encoded == 0
    assert [f16_bytes(e) for e in embs] == originals
    cache2.get(5, frames_by_key)
    assert second.n_encoded == 1
    assert not list((tmp_path / TinyBackend.name).glob("*.tmp"))  # writes are atomic, nothing left over


def test_unreadable_persisted_file_is_encoded_again(tmp_path):
    backend = TinyBackend()
    cache = EmbeddingCache(backend, persist_dir=tmp_path)
    path = tmp_path / TinyBackend.name / f"{key_digest(7)}.npy"
    path.write_bytes(b"\x93NUMPY truncated")
    emb = cache.get(7, frames_by_key)
    assert backend.n_encoded == 1
    assert_close_to(emb, expected(backend, 7))
    assert np.load(path).tobytes() == f16_bytes(emb)


def test_close_removes_the_spill_folder():
    backend = TinyBackend()
    cache = EmbeddingCache(backend, cap_bytes=EMB_BYTES)
    cache.ensure(list(range(4)), frames_by_key)
    spill = cache._spill
    assert spill is not None and spill.is_dir() and cache.spilled == 3
    cache.close()
    assert not spill.exists()
    # still usable afterwards: lost entries are encoded again on demand
    assert_close_to(cache.get(0, frames_by_key), expected(backend, 0))
    cache.close()


# ---- the real default backend ----------------------------------------------------------------------------
def test_litemedsam_encodes_and_segments_a_bright_square():
    from FewShotSAMLib.sam import load_backend

    backend = load_backend("litemedsam", "cpu")
    frame = np.full((256, 256), 0.05, np.float32)
    frame[90:170, 70:150] = 0.9  # 80 x 80 bright square
    emb = backend.encode(frame)
    assert tuple(emb.shape) == (1, 256, 64, 64) and torch.isfinite(emb).all()
    res = backend.decode(emb[0], Prompts(box=[84, 64, 176, 156]))
    mask = res.mask
    square = np.zeros_like(mask)
    square[90:170, 70:150] = True
    assert mask.any()
    inside = (mask & square).sum()
    # measured: 5116 mask pixels, all inside the square (80% of it, score 0.92): LiteMedSAM trims the rim
    assert inside / mask.sum() > 0.95 and inside / square.sum() > 0.7, (inside, mask.sum())


def test_drop_memory_keeps_spilled_files_and_encodes_only_the_rest():
    backend = TinyBackend()
    cache = EmbeddingCache(backend, cap_bytes=int(2.5 * EMB_BYTES))  # two in memory
    first = {k: f16_bytes(cache.get(k, frames_by_key)) for k in range(4)}  # 0, 1 spilled; 2, 3 in memory
    assert cache.spilled == 2 and backend.n_encoded == 4
    cache.drop_memory()
    assert cache.memory_bytes == 0 and 2 not in cache and 0 in cache
    assert f16_bytes(cache.get(0)) == first[0] and backend.n_encoded == 4  # read back from the spill folder
    assert f16_bytes(cache.get(3, frames_by_key)) == first[3] and backend.n_encoded == 5  # encoded again
    cache.close()
