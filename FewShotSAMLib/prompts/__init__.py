"""Prompt generators: each turns a support example and a query embedding into SAM prompts.

``make_generator(name)`` builds one by name; each generator lives in its own module and is imported only
when asked for, so a missing optional dependency of one generator does not affect the others. The name
``auto`` (the default) is the generator that measured best with the SAM model in use
(``recommended_generator``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from typing import Optional

from ..errors import UserInputError
from ..sam.names import DEFAULT_SAM
from ..prompt_types import Prompts, QueryContext, Support
from .base import PromptGenerator

# name -> (module, class).
GENERATORS: dict[str, tuple[str, str]] = {
    "boxprop": ("boxprop", "BoxPropagation"),
    "fob": ("fob", "FoBGenerator"),
    "persam": ("persam", "PerSAM"),
    "p2sam": ("p2sam", "P2SAM"),
    "synpo": ("synpo", "SynPo"),
    "coarse": ("coarse", "CoarseMaskPrompts"),
}
DEFAULT_GENERATOR = "auto"  # recommended_generator() for the SAM model in use


def recommended_generator(sam: Optional[str] = None) -> str:
    """The generator that measured best with the SAM model ``sam`` (a name; None for the default model):
    what 'auto' means on the command line, in the API and in the Slicer module.

    Product protocol on CHAOS (one painted slice, automatic extent; docs/FOB.md, docs/RESULTS.md): FoB inside
    the propagation (the neighbour's box, FoB deciding where the target ends) where the shipped FoB weights
    are calibrated for that model and beat box propagation there (``propagation`` in their metadata,
    cross-validated: litemedsam-points 89.19 vs 87.50, vit_t 78.75 vs 73.73); box propagation for every
    other model (87.53 with the box-trained LiteMedSAM, far ahead of the generators that place points there).
    """
    from ..fob import shipped_weights

    name = str(sam or DEFAULT_SAM).lower()
    metadata = shipped_weights(name).with_suffix(".json")
    if importlib.util.find_spec(f"{__name__}.fob") is not None and metadata.is_file():
        try:
            calibration = json.loads(metadata.read_text()).get("propagation") or {}
        except ValueError:
            calibration = {}
        if (calibration.get("sam_backend") == name and calibration.get("min_corr") is not None
                and calibration.get("cv_dice", 0.0) > calibration.get("boxprop_cv_dice", 100.0)):
            return "fob"
    return "boxprop"


def available_generators() -> list[str]:
    """Names of the generators whose module is present."""
    names = []
    for name, (mod, _) in GENERATORS.items():
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            names.append(name)
    return names


def make_generator(name: str | PromptGenerator = DEFAULT_GENERATOR, sam: Optional[str] = None,
                   **options) -> PromptGenerator:
    """Build a generator by name (or return ``name`` if it already is one); ``auto`` is the one recommended
    for the SAM model ``sam``, and a generator with weights per SAM model (FoB) gets those for ``sam``."""
    if not isinstance(name, str):
        return name
    key = name.lower()
    if key == "auto":
        key = recommended_generator(sam)
    if key not in GENERATORS or key not in available_generators():
        raise UserInputError(
            f"Unknown prompt generator '{name}'; choose auto or one of {', '.join(available_generators())}."
        )
    mod, cls = GENERATORS[key]
    factory = getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
    if sam is not None and "sam" in inspect.signature(factory).parameters:
        options.setdefault("sam", sam)
    return factory(**options)


__all__ = ["GENERATORS", "DEFAULT_GENERATOR", "PromptGenerator", "Prompts", "QueryContext", "Support",
           "available_generators", "make_generator", "recommended_generator"]
