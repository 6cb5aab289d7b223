"""The PromptGenerator protocol shared by every prompt generator.

The data it works on (``Prompts``, ``Support``, ``QueryContext``; coordinates in the model frame) lives in
``FewShotSAMLib.prompt_types`` and is re-exported here for code that imports it from this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..prompt_types import Prompts, QueryContext, Support

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..sam.backend import SamBackend


@runtime_checkable
class PromptGenerator(Protocol):
    """Turns a support example and a query embedding into Prompts.

    A generator never encodes images; multi-pass generators may call ``backend.decode``.
    """

    name: str

    def generate(
        self, support: Support, query: "torch.Tensor", context: QueryContext, backend: "SamBackend"
    ) -> Prompts:
        """Return the prompts for one query slice."""
        ...
