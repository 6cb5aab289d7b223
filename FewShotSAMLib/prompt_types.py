"""The data that flows between the prompt generators, the SAM backends and the engine: ``Prompts`` (what
is fed to SAM on one slice), ``Support``, ``QueryContext`` and ``SlicePrompts`` (the same prompts in voxel
indices). Plain dataclasses over numpy; this module imports nothing from the package, so every other
module can use them without importing another's code.

Coordinates: every point and box inside the library is in the *model frame*: a square image of
``backend.input_size`` pixels per side into which a slice is resized (physical aspect kept, longest side
filling the square, padding at the bottom/right; see ``volume.SliceFrame``). Points are ``(row, col)``
floats with pixel centres at integer positions. Boxes are ``(row0, col0, row1, col1)``.
Conversions to voxel indices or physical coordinates happen only at the edges (``volume.SliceFrame``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _points(a) -> np.ndarray:
    arr = np.asarray(a if a is not None else np.zeros((0, 2)), dtype=np.float32)
    return arr.reshape(-1, 2)


@dataclass
class Prompts:
    """What is fed to SAM for one query slice (model-frame coordinates, see module docstring).

    ``presence`` is the generator's confidence (0..1) that the target is present on the query slice;
    the engine's automatic extent uses it. ``mask_input`` is an optional 256x256 low-resolution logit
    map for multi-pass generators; it is not serialised, so an edited re-run goes without it.
    ``box_growth`` (model-frame pixels, 0 = the box is fixed) lets the engine widen the box on each side
    SAM's answer reaches and decode again: set by generators whose box is the neighbouring slice's answer's
    box, which a target that widens from one slice to the next outgrows. The box recorded with the answer
    is the widened one, so an edited re-run decodes that box as it is (the field is not serialised).
    """

    fg_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    bg_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    box: Optional[np.ndarray] = None
    presence: float = 1.0
    mask_input: Optional[np.ndarray] = None
    box_growth: float = 0.0

    def __post_init__(self) -> None:
        self.fg_points = _points(self.fg_points)
        self.bg_points = _points(self.bg_points)
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to feed to SAM."""
        return self.box is None and len(self.fg_points) == 0 and len(self.bg_points) == 0


@dataclass
class Support:
    """One painted (support) slice: its SAM embedding and its mask in the model frame."""

    embedding: "torch.Tensor"  # (C, h, w) float32 on the backend's device
    mask: np.ndarray  # (S, S) bool, model frame
    slice_index: int = -1


@dataclass
class QueryContext:
    """What the engine knows about a query slice besides its embedding.

    ``neighbour_mask`` is the model-frame mask the engine accepted on the adjacent, already segmented
    slice on the side of the support (None for the first slice next to the painted one is the support
    mask itself). ``valid`` marks the model-frame pixels that belong to the image (not padding).
    """

    neighbour_mask: Optional[np.ndarray]
    valid: np.ndarray
    slice_index: int = -1
    distance: int = 0  # slices between the query and its support


@dataclass
class SlicePrompts:
    """Prompts fed to SAM on one slice, in the volume's numpy-order voxel indices (a0, a1, a2).

    A target in several pieces is prompted piece by piece: ``pieces`` then holds one SlicePrompts per
    piece, and ``fg``/``bg`` are all the pieces' points together, ``box`` their boxes stacked (two corners
    per piece, (2k, 3)). ``hole_bg`` are the background points placed inside holes of the target (also
    in ``bg``, so everything that draws ``bg`` shows them).

    The engine's answers fill every field; an edit given to ``VolumeSession.segment_from_prompts`` needs
    only ``slice_index``, ``fg``, ``bg`` and ``box`` (and ``pieces`` / ``hole_bg`` for a target in pieces).
    """

    slice_index: int
    fg: np.ndarray  # (N, 3)
    bg: np.ndarray  # (M, 3)
    box: Optional[np.ndarray]  # (2, 3) corners (2k, 3 for k pieces), or None
    score: float = 0.0
    presence: float = 1.0
    support_index: int = -1
    model: Optional[Prompts] = None  # the same prompts in the model frame (what the backend saw; the first piece's)
    pieces: list["SlicePrompts"] = field(default_factory=list)  # per piece, when there are several
    hole_bg: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (K, 3), part of bg

    @classmethod
    def from_dict(cls, slice_index: int, entry: Mapping) -> "SlicePrompts":
        """An edit given as ``{'fg', 'bg', 'box', 'hole_bg', 'pieces'}`` (numpy-order voxel indices; 'box',
        'hole_bg' and 'pieces', a list of such dicts, are optional)."""
        def voxels(v) -> np.ndarray:
            return np.asarray(v, dtype=float).reshape(-1, 3)

        box, hole = entry.get("box"), entry.get("hole_bg")
        return cls(int(slice_index), voxels(entry["fg"]), voxels(entry["bg"]), None if box is None else voxels(box),
                   pieces=[cls.from_dict(slice_index, p) for p in entry.get("pieces") or []],
                   hole_bg=np.zeros((0, 3)) if hole is None else voxels(hole))
