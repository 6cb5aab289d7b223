"""The library's run-time settings as one value: ``RuntimeOptions``.

Each setting can come from a ``FEWSHOTSAM_*`` environment variable (the names users know from the README
and docs/PERFORMANCE.md). The variables are read by :meth:`RuntimeOptions.from_environment` only, called
at the edges (the command line, the Slicer module); the options are then passed down explicitly. A
Python caller who passes none gets :func:`default_options`, the environment as it is at that call.

Importing this module imports no torch (the Slicer module reads it before its dependencies exist).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from .errors import UserInputError

PRECISIONS = ("fp32", "bf16", "fp16", "mixed")  # the encoder's arithmetic (sam/device.py: resolve_precision)
RUNTIMES = ("torch", "onnxruntime", "openvino")  # what runs the encoder or the mask decoder (sam/runtime_choice.py)
DEFAULT_CAP_BYTES = 512 << 20  # 512 MiB: 256 LiteMedSAM slices, 64 ViT slices in float16; the rest spills to disk


def _home_cache() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "fewshotsam"


@dataclass(frozen=True)
class RuntimeOptions:
    """How the library runs (not what it segments). Defaults are the library's own choices; 'auto' lets
    the backend choose for the model and the machine (docs/PERFORMANCE.md)."""

    precision: str = "auto"  # the encoder's arithmetic: auto | fp32 | bf16 | fp16 | mixed
    runtime: str = "auto"  # what runs the image encoder: auto | torch | onnxruntime | openvino
    decoder_runtime: str = "auto"  # what runs the mask decoder: auto | torch | onnxruntime | openvino
    decoder_threads: Optional[int] = None  # threads of an exported decoder; None: torch's thread count
    compile: bool = False  # torch.compile the encoder
    channels_last: bool = False  # channels-last memory layout for the encoder's convolutions
    onnx_dir: Path = field(default_factory=lambda: _home_cache() / "onnx")  # exported encoders (+ OpenVINO's cache)
    weights_dir: Path = field(default_factory=_home_cache)  # downloaded SAM weights
    embedding_cap_bytes: int = DEFAULT_CAP_BYTES  # the embedding cache's memory cap; beyond it, disk

    def __post_init__(self) -> None:
        for name in ("precision", "runtime", "decoder_runtime"):
            object.__setattr__(self, name, ENVIRONMENT[name][1](getattr(self, name), name))
        if self.decoder_threads is not None:
            object.__setattr__(self, "decoder_threads", _count(self.decoder_threads, "decoder_threads"))
        if int(self.embedding_cap_bytes) <= 0:
            raise UserInputError(f"embedding_cap_bytes={self.embedding_cap_bytes} must be a positive number of bytes.")
        for name in ("onnx_dir", "weights_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None,
                         defaults: Optional["RuntimeOptions"] = None) -> "RuntimeOptions":
        """``defaults`` (the library's own when None) with every variable of :data:`ENVIRONMENT` that is
        set (and not empty) in ``environ`` (``os.environ`` when None). A value that means nothing is a
        UserInputError naming the variable and what it takes."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, (variable, parse) in ENVIRONMENT.items():
            text = (environ.get(variable) or "").strip()
            if text:
                values[name] = parse(text, variable)
        return dataclasses.replace(defaults or cls(), **values)


def default_options() -> RuntimeOptions:
    """The options of a Python caller who passes none: the environment as it is now."""
    return RuntimeOptions.from_environment()


# ---- reading one value ---------------------------------------------------------------------------
def _choice(choices: tuple[str, ...], what: str) -> Callable[[str, str], str]:
    def parse(text: str, name: str) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise UserInputError(f"{name}='{text}' is not {what}; use one of {', '.join(choices)}.")
        return value

    return parse


def _switch(text: str, name: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UserInputError(f"{name}='{text}' is not a switch; set it to 1 or 0, or unset it.")


def _count(text, name: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise UserInputError(f"{name}='{text}' is not a number of threads; set it to a whole number such as 2, "
                             "or unset it.")
    return value


def _mebibytes(text: str, name: str) -> int:
    try:
        mb = float(text)
    except ValueError:
        raise UserInputError(f"{name}='{text}' is not a number of MiB; set it to a number such as 512, or unset it.") from None
    if mb <= 0:
        raise UserInputError(f"{name}='{text}' must be a positive number of MiB.")
    return int(mb * 2**20)


def _folder(text: str, name: str) -> Path:
    return Path(text)


# field -> (environment variable, its parser); the variables' names and meanings are part of the user
# interface (README, docs/PERFORMANCE.md, docs/SLICER.md).
ENVIRONMENT: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "precision": ("FEWSHOTSAM_PRECISION", _choice(("auto",) + PRECISIONS, "a precision")),
    "runtime": ("FEWSHOTSAM_RUNTIME", _choice(("auto",) + RUNTIMES, "an encoder runtime")),
    "decoder_runtime": ("FEWSHOTSAM_DECODER_RUNTIME", _choice(("auto",) + RUNTIMES, "a decoder runtime")),
    "decoder_threads": ("FEWSHOTSAM_DECODER_THREADS", _count),
    "compile": ("FEWSHOTSAM_COMPILE", _switch),
    "channels_last": ("FEWSHOTSAM_CHANNELS_LAST", _switch),
    "onnx_dir": ("FEWSHOTSAM_ONNX_DIR", _folder),
    "weights_dir": ("FEWSHOTSAM_CACHE", _folder),
    "embedding_cap_bytes": ("FEWSHOTSAM_CACHE_CAP_MB", _mebibytes),
}
