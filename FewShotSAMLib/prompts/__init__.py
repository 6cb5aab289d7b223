"""Prompt generators: each turns a support example and a query embedding into SAM prompts.

``make_generator(name)`` builds one by name; each generator lives in its own module and is imported only
when asked for, so a missing optional dependency of one generator does not affect the others.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import UserInputError
from ..prompt_types import Prompts, QueryContext, Support
from .base import PromptGenerator

# name -> (module, class). The default generator is the first one.
GENERATORS: dict[str, tuple[str, str]] = {
    "boxprop": ("boxprop", "BoxPropagation"),
    "fob": ("fob", "FoBGenerator"),
    "persam": ("persam", "PerSAM"),
    "p2sam": ("p2sam", "P2SAM"),
    "synpo": ("synpo", "SynPo"),
    "coarse": ("coarse", "CoarseMaskPrompts"),
}
DEFAULT_GENERATOR = "boxprop"


def recommended_generator() -> str:
    """The generator that measured best, whatever the SAM model (what 'auto' means in the Slicer module).

    Measured on CHAOS (docs/RESULTS.md, product protocol: one painted slice, automatic extent): with the
    box-trained LiteMedSAM, box propagation (87 % Dice on fold 0) is far ahead of every prompt generator
    that places points, FoB included (its ring gives a box ~20 px off). FoB weights exist only for
    LiteMedSAM's embeddings, so for the other SAM models box propagation is also the one that can run.
    """
    return DEFAULT_GENERATOR


def available_generators() -> list[str]:
    """Names of the generators whose module is present."""
    names = []
    for name, (mod, _) in GENERATORS.items():
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            names.append(name)
    return names


def make_generator(name: str | PromptGenerator = DEFAULT_GENERATOR, **options) -> PromptGenerator:
    """Build a generator by name (or return ``name`` if it already is one)."""
    if not isinstance(name, str):
        return name
    key = name.lower()
    if key not in GENERATORS or key not in available_generators():
        raise UserInputError(
            f"Unknown prompt generator '{name}'; choose one of {', '.join(available_generators())}."
        )
    mod, cls = GENERATORS[key]
    module = importlib.import_module(f"{__name__}.{mod}")
    return getattr(module, cls)(**options)


__all__ = ["GENERATORS", "DEFAULT_GENERATOR", "PromptGenerator", "Prompts", "QueryContext", "Support",
           "available_generators", "make_generator", "recommended_generator"]
