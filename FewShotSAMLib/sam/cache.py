"""The embedding cache: each slice is encoded at most once and shared by every segment and generator.

Embeddings are stored in float16 in memory up to a byte cap (least recently used first out); beyond the
cap they spill to files in a temporary folder (or a persistent folder, which also serves later runs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Sequence

import numpy as np
import torch

from ..options import RuntimeOptions, default_options
from ..threads import one_torch_thread
from .backend import SamBackend

log = logging.getLogger(__name__)


def key_digest(key: Hashable) -> str:
    """Stable file-name-safe digest of a cache key."""
    return hashlib.sha1(repr(key).encode()).hexdigest()[:24]


def _save_atomic(path: Path, emb: np.ndarray) -> None:
    """Write ``emb`` to ``path`` through a temporary file so that a reader (another process sharing the
    persistent folder) never sees a half-written file, and an interrupted run leaves none behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, emb)
    os.replace(tmp, path)


class EmbeddingCache:
    """LRU cache of (C, h, w) float16 embeddings with a memory cap and disk spill.

    ``persist_dir`` (optional) keeps every embedding on disk across runs, in a folder named after the
    backend and its precision (``backend.cache_name``: 'litemedsam' for float32, 'litemedsam-bf16', ...)
    and keyed by the caller's key; callers must make keys that change whenever the pixels fed to the
    encoder change. While one batch is encoded, the frames of the next one are prepared in a thread.
    ``cap_bytes`` None takes ``options.embedding_cap_bytes`` (None: the FEWSHOTSAM_* environment).
    """

    def __init__(self, backend: SamBackend, cap_bytes: Optional[int] = None,
                 persist_dir: Optional[str | os.PathLike] = None, options: Optional[RuntimeOptions] = None) -> None:
        self.backend = backend
        if cap_bytes is None:
            cap_bytes = (options if options is not None else default_options()).embedding_cap_bytes
        self.cap_bytes = int(cap_bytes)
        self._mem: "OrderedDict[Hashable, np.ndarray]" = OrderedDict()
        self._mem_bytes = 0
        self._persist = Path(persist_dir) / getattr(backend, "cache_name", backend.name) if persist_dir else None
        if self._persist:
            self._persist.mkdir(parents=True, exist_ok=True)
        self._spill: Optional[Path] = None
        self._on_disk: set = set()
        self.encoded = 0  # how many slices this cache has sent to the encoder
        self.spilled = 0

    # ---- storage --------------------------------------------------------------------------------
    def _disk_path(self, key: Hashable) -> Path:
        if self._persist is not None:
            return self._persist / f"{key_digest(key)}.npy"
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="fewshotsam-emb-"))
        return self._spill / f"{key_digest(key)}.npy"

    def _put(self, key: Hashable, emb: np.ndarray) -> None:
        if key in self._mem:
            return
        self._mem[key] = emb
        self._mem_bytes += emb.nbytes
        while self._mem_bytes > self.cap_bytes and len(self._mem) > 1:
            old_key, old = self._mem.popitem(last=False)
            self._mem_bytes -= old.nbytes
            if old_key not in self._on_disk:
                _save_atomic(self._disk_path(old_key), old)
                self._on_disk.add(old_key)
                self.spilled += 1

    def _lookup(self, key: Hashable) -> Optional[np.ndarray]:
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._mem[key]
        if key in self._on_disk or (self._persist is not None and self._disk_path(key).exists()):
            path = self._disk_path(key)
            try:
                emb = np.load(path)
            except (OSError, ValueError, EOFError) as exc:  # unreadable file: encode the slice again
                log.warning("Embedding file %s is unreadable (%s); the slice will be encoded again", path, exc)
                self._on_disk.discard(key)
                path.unlink(missing_ok=True)
                return None
            self._on_disk.add(key)
            self._put(key, emb)
            return emb
        return None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._mem or key in self._on_disk or (
            self._persist is not None and self._disk_path(key).exists())

    @property
    def memory_bytes(self) -> int:
        """Bytes of embeddings held in memory now."""
        return self._mem_bytes

    # ---- the API --------------------------------------------------------------------------------
    def ensure(self, keys: Sequence[Hashable], frame: Callable[[Hashable], np.ndarray],
               on_encoded: Optional[Callable[[int], None]] = None) -> None:
        """Encode the keys not cached yet, in batches of ``backend.batch_size``.

        ``frame(key)`` returns the (S, S) model-frame slice in [0, 1]; ``on_encoded(n)`` is called after
        each batch with the number of slices it encoded (for progress bars and cancellation).
        """
        missing = [k for k in dict.fromkeys(keys) if k not in self]
        if not missing:
            return
        bs = max(1, int(self.backend.batch_size))
        chunks = [missing[start:start + bs] for start in range(0, len(missing), bs)]

        def prepare(chunk: list) -> np.ndarray:
            return np.stack([np.asarray(frame(k), dtype=np.float32) for k in chunk])

        if len(chunks) == 1:
            self._encode_chunk(chunks[0], prepare(chunks[0]), on_encoded)
            return
        from concurrent.futures import ThreadPoolExecutor

        # Preparing frames (numpy/OpenCV, which release the GIL) overlaps with the encoder's work.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewshotsam-frames") as pool:
            pending = pool.submit(prepare, chunks[0])
            for i, chunk in enumerate(chunks):
                frames = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[i + 1])
                self._encode_chunk(chunk, frames, on_encoded)

    def _encode_chunk(self, chunk: list, frames: np.ndarray,
                      on_encoded: Optional[Callable[[int], None]]) -> None:
        """Encode one batch and store it (and persist it when a persistent folder is set)."""
        encode = getattr(self.backend, "encode_to_host", None)
        if encode is not None:
            emb = encode(frames)
        else:
            emb = self.backend.encode(frames).to(torch.float16).cpu().numpy()
        self.encoded += len(chunk)
        for k, e in zip(chunk, emb):
            e = e.copy()  # its own buffer, so that evicting it frees its memory
            if self._persist is not None:
                _save_atomic(self._disk_path(k), e)
                self._on_disk.add(k)
            self._put(k, e)
        if on_encoded is not None:
            on_encoded(len(chunk))

    def get(self, key: Hashable, frame: Optional[Callable[[Hashable], np.ndarray]] = None) -> torch.Tensor:
        """The (C, h, w) float32 embedding of ``key`` on the backend's device, encoding it if needed."""
        emb = self._lookup(key)
        if emb is None:
            if frame is None:
                raise KeyError(key)
            self.ensure([key], frame)
            emb = self._lookup(key)
        if self.backend.device.type == "cpu":
            # torch's vectorised cast: about 0.1 ms for a LiteMedSAM embedding where numpy's takes 2.5 ms
            with one_torch_thread():
                return torch.from_numpy(emb).float()
        return torch.from_numpy(emb).to(self.backend.device).float()  # float16 over the bus, cast on the device

    def get_many(self, keys: Iterable[Hashable], frame: Callable[[Hashable], np.ndarray]) -> list[torch.Tensor]:
        """Embeddings of several keys, encoding the missing ones in batches."""
        keys = list(keys)
        self.ensure(keys, frame)
        return [self.get(k) for k in keys]

    def drop_memory(self) -> None:
        """Forget the embeddings held in memory (files spilled or persisted stay on disk); a later ``get``
        loads or encodes them again. For one-shot runs that need the memory back before their last step."""
        self._mem.clear()
        self._mem_bytes = 0

    def close(self) -> None:
        """Delete the temporary spill folder (persistent files stay)."""
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
            self._on_disk = {k for k in self._on_disk if self._persist is not None}

    def __del__(self) -> None:  # pragma: no cover - best effort clean-up
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
