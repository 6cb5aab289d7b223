"""The prompts JSON written by ``segment --prompts-out`` and read back by ``segment --prompts-in``.

Per segmented slice it holds the foreground points, background points and box fed to SAM, in voxel IJK
(ITK order, the reverse of numpy's) and physical LPS millimetres, plus SAM's mask score. When a point is
edited, its "ijk" is authoritative; a point given only with "lps" is converted to voxels.

Background points placed inside a hole of the target (the spinal canal inside a vertebra; only when the
engine runs with ``ShapeRules(hole_points=True)``) are listed under "hole_background" (SAM gets them as
background points like the others). A slice where the target
is in several pieces (both kidneys) has, instead of the slice-level points and box, a list "pieces" with
each piece's "foreground", "background", "hole_background" and "box"; each piece is decoded on its own.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from .engine import SegmentationResult, SlicePrompts
from .errors import UserInputError
from .volume import Volume, atomic_write

FORMAT = "fewshotsam-prompts"
VERSION = 1


def _pts(vol: Volume, idx: Optional[np.ndarray]) -> list[dict]:
    if idx is None or len(idx) == 0:
        return []
    idx = np.asarray(idx, dtype=float).reshape(-1, 3)
    lps = vol.index_to_lps(idx)
    return [{"ijk": [round(float(v), 3) for v in i[::-1]], "lps": [round(float(v), 3) for v in p]}
            for i, p in zip(idx, lps)]


def _prompt_fields(vol: Volume, sp) -> dict:
    """The points and box of one SlicePrompts (or one piece of it)."""
    hole = np.asarray(getattr(sp, "hole_bg", np.zeros((0, 3))), float).reshape(-1, 3)
    bg = np.asarray(sp.bg, float).reshape(-1, 3)
    if len(hole) and len(bg):  # hole points are part of bg; list them once, under hole_background
        bg = bg[np.abs(bg[:, None, :] - hole[None, :, :]).max(-1).min(1) > 1e-6]
    return {"foreground": _pts(vol, sp.fg), "background": _pts(vol, bg), "hole_background": _pts(vol, hole),
            "box": _pts(vol, sp.box) if sp.box is not None else None}


def prompts_to_json(result: SegmentationResult, vol: Volume, **info) -> dict:
    """A JSON-ready dict of the result's per-slice prompts (``info`` adds top-level fields)."""
    slices = []
    for k in sorted(result.prompts):
        sp = result.prompts[k]
        entry = {
            "slice": int(k),
            "support": int(sp.support_index),
            "score": round(float(sp.score), 4),
            "presence": round(float(sp.presence), 4),
        }
        if len(getattr(sp, "pieces", [])) > 1:
            entry["pieces"] = [{"score": round(float(p.score), 4), **_prompt_fields(vol, p)} for p in sp.pieces]
        else:
            entry.update(_prompt_fields(vol, sp))
        slices.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        **info,
        "axis_numpy": int(result.axis),
        "axis_ijk": int(2 - result.axis),
        "painted_slices": [int(p) for p in result.painted],
        "slices": slices,
    }


def write_prompts(path: str | os.PathLike, data: dict) -> None:
    """Write the prompts JSON atomically."""
    text = json.dumps(data, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def _read_points(vol: Volume, items, where: str) -> np.ndarray:
    out = []
    for item in items or []:
        if isinstance(item, dict) and "ijk" in item:
            out.append(np.asarray(item["ijk"], dtype=float)[::-1])
        elif isinstance(item, dict) and "lps" in item:
            out.append(vol.lps_to_index(np.asarray(item["lps"], dtype=float))[0])
        else:
            raise UserInputError(f"A point in {where} has neither 'ijk' nor 'lps'; give each point one of them.")
        if len(out[-1]) != 3:
            raise UserInputError(f"A point in {where} does not have three coordinates.")
    return np.asarray(out, dtype=float).reshape(-1, 3)


def _read_prompt_fields(vol: Volume, entry: dict, where: str, axis: int, k: int) -> dict:
    """{'fg', 'bg', 'box', 'hole_bg'} of one slice or piece entry (hole points are part of 'bg')."""
    if not isinstance(entry, dict):
        raise UserInputError(f"{where[0].upper() + where[1:]} is not an object with points; fix the prompts file.")
    fg = _read_points(vol, entry.get("foreground"), where)
    hole = _read_points(vol, entry.get("hole_background"), where)
    bg = np.concatenate([_read_points(vol, entry.get("background"), where), hole])
    box = _read_points(vol, entry.get("box"), where) if entry.get("box") else None
    for pts in (fg, bg) + ((box,) if box is not None else ()):
        off = np.abs(pts[:, axis] - k) > 0.5
        if off.any():
            raise UserInputError(f"A point listed under {where} lies on another slice; keep its slice coordinate at {k}.")
    return {"fg": fg, "bg": bg, "box": box, "hole_bg": hole}


def read_prompts(path: str | os.PathLike, vol: Volume) -> tuple[int, dict[int, SlicePrompts]]:
    """Read a prompts JSON: (numpy slicing axis, {slice: SlicePrompts with ``fg``, ``bg``, ``box`` and
    ``hole_bg`` in numpy-order voxels}); a slice in pieces also has ``pieces``, one such SlicePrompts per
    piece (see the module docstring). What ``VolumeSession.segment_from_prompts`` takes."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserInputError(f"The prompts file '{path}' does not exist; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"The prompts file '{path}' is not valid JSON ({exc}); fix or re-create it.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "slices" not in data:
        raise UserInputError(f"'{path}' is not a FewShotSAM prompts file (written by segment --prompts-out).")
    axis = int(data.get("axis_numpy", 2 - int(data.get("axis_ijk", 2))))
    n = vol.array.shape[axis]
    out: dict[int, SlicePrompts] = {}
    for entry in data["slices"]:
        k = int(entry["slice"])
        if not 0 <= k < n:
            raise UserInputError(f"The prompts file names slice {k}, outside the image's slices 0 to {n - 1}.")
        where = f"slice {k}"
        if entry.get("pieces"):
            if not isinstance(entry["pieces"], list):
                raise UserInputError(f"'pieces' of {where} must be a list of pieces, each with its points and box.")
            pieces = [_read_prompt_fields(vol, piece, f"piece {i + 1} of {where}", axis, k)
                      for i, piece in enumerate(entry["pieces"])]
            out[k] = SlicePrompts.from_dict(k, {"fg": np.concatenate([p["fg"] for p in pieces]),
                                                "bg": np.concatenate([p["bg"] for p in pieces]), "box": None,
                                                "pieces": pieces})
        else:
            out[k] = SlicePrompts.from_dict(k, _read_prompt_fields(vol, entry, where, axis, k))
    return axis, out
