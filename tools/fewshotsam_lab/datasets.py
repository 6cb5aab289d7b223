"""The data the lab runs on, in one place: where it lives, how its files are named, the CHAOS organs and
folds, the published scores we compare with, and the TotalSegmentator example's files.

- Data folder: ``$FEWSHOTSAM_DATA`` when set (read here only), else ``../shared/data`` beside the
  repository; ``chaos_t2/`` and ``totalseg_ct/`` inside it (see that folder's README).
- CHAOS T2 (the "Abd-MRI" few-shot benchmark): ``image_<id>.nii.gz`` with ``label_<id>.nii.gz``; labels
  1 liver, 2 right kidney, 3 left kidney, 4 spleen. Folds: volumes sorted by numeric id; positions
  {0-4}, {4-8}, {8-12}, {12-16}, {16-19, 0} (5 test volumes per fold; neighbouring folds share one
  volume, as in the SSL-ALPNet/ADNet/FoB code).
- TotalSegmentator example CT: ``example_ct_sm.nii.gz`` and its label map ``example_seg.nii.gz``
  (1 spleen, 2 right kidney, 3 left kidney, 5 liver, ...), the DICOM series ``example_ct_dicom/`` and its
  label map ``example_seg_dicom.nii.gz``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from FewShotSAMLib.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "FEWSHOTSAM_DATA"

# ---- CHAOS T2 -------------------------------------------------------------------------------------
CHAOS_SUBDIR = "chaos_t2"
ORGANS: dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
# Targets made of several labels, painted and scored as one (issue "pieces and holes"): --organs 2+3
COMBINED: dict[int, tuple[str, tuple[int, ...]]] = {23: ("both_kidneys", (2, 3))}
TARGET_NAMES: dict[int, str] = {**ORGANS, **{k: name for k, (name, _) in COMBINED.items()}}
FOLD_POSITIONS: list[list[int]] = [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16],
                                   [16, 17, 18, 19, 0]]
PUBLISHED = {  # 1-shot CHAOS-MRI (Abd-MRI), mean Dice %, as published
    "FoB + SAM ViT-H": (84.46, "FoB paper (Focus on Background), Setting 1"),
    "SynPo": (81.15, "SynPo paper, Table 1 (CHAOS-MRI)"),
    "ProtoSAM": (77.83, "as reported in the SynPo paper, Table 1"),
    "PerSAM": (61.12, "as reported in the SynPo paper, Table 1"),
}

# ---- TotalSegmentator example CT ------------------------------------------------------------------
TOTALSEG_SUBDIR = "totalseg_ct"
TOTALSEG_CT = "example_ct_sm.nii.gz"
TOTALSEG_LABELS = "example_seg.nii.gz"
TOTALSEG_LIVER = 5


def data_root() -> Path:
    """The shared data folder: ``$FEWSHOTSAM_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data"))


def chaos_dir(root: Optional[Path] = None) -> Path:
    """The CHAOS T2 folder inside ``root`` (default :func:`data_root`)."""
    return Path(root if root is not None else data_root()) / CHAOS_SUBDIR


def chaos_case(case_id: int, root: Optional[Path] = None) -> tuple[Path, Path]:
    """(image, label map) paths of CHAOS volume ``case_id``."""
    d = chaos_dir(root)
    return d / f"image_{case_id}.nii.gz", d / f"label_{case_id}.nii.gz"


def totalseg_dir(root: Optional[Path] = None) -> Path:
    """The TotalSegmentator example folder inside ``root`` (default :func:`data_root`)."""
    return Path(root if root is not None else data_root()) / TOTALSEG_SUBDIR


def totalseg_ct(folder: Optional[Path] = None) -> tuple[Path, Path]:
    """(CT, label map) paths of the TotalSegmentator example in ``folder`` (default :func:`totalseg_dir`)."""
    d = Path(folder) if folder is not None else totalseg_dir()
    return d / TOTALSEG_CT, d / TOTALSEG_LABELS


def list_cases(data_dir: str | Path, labels: bool = True) -> list[tuple[int, Path, Optional[Path]]]:
    """(id, image path, label path) of every ``image_<id>.nii.gz`` of a CHAOS-style folder, sorted by
    numeric id. With ``labels`` only the images that have their ``label_<id>.nii.gz``; without, every
    image, its label path None where the label file is absent."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserInputError(f"The data folder '{data_dir}' does not exist; pass --data pointing at a folder of "
                             "image_<id>.nii.gz volumes such as chaos_t2.")
    cases = []
    for img in d.glob("image_*.nii.gz"):
        stem = img.name[len("image_"):-len(".nii.gz")]
        if not stem.isdigit():
            continue
        lab = d / f"label_{stem}.nii.gz"
        if lab.exists():
            cases.append((int(stem), img, lab))
        elif not labels:
            cases.append((int(stem), img, None))
    if not cases:
        what = "image_<id>.nii.gz / label_<id>.nii.gz pairs" if labels else "image_<id>.nii.gz volumes"
        raise UserInputError(f"The data folder '{data_dir}' holds no {what}.")
    return sorted(cases)


def fold_volume_ids(ids: Sequence[int], fold: int) -> list[int]:
    """The ids of the test volumes of ``fold`` (0-4) from the sorted id list (needs 20 volumes)."""
    if not 0 <= fold < len(FOLD_POSITIONS):
        raise UserInputError(f"Fold {fold} does not exist; use folds 0 to {len(FOLD_POSITIONS) - 1}.")
    ids = sorted(ids)
    if max(FOLD_POSITIONS[fold]) >= len(ids):
        raise UserInputError(f"Fold {fold} needs at least {max(FOLD_POSITIONS[fold]) + 1} volumes; the data has {len(ids)}.")
    return [ids[p] for p in FOLD_POSITIONS[fold]]


def parse_folds(text: str) -> list[int]:
    """'0-4' / '0,2' / '3' -> sorted fold indices."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise UserInputError(f"--folds '{text}' is not a fold list; write e.g. 0-4 or 0,2.") from None
    bad = [f for f in out if not 0 <= f < len(FOLD_POSITIONS)]
    if bad or not out:
        raise UserInputError(f"--folds '{text}' must name folds between 0 and {len(FOLD_POSITIONS) - 1}.")
    return sorted(out)


def target_mask(label: np.ndarray, organ: int) -> np.ndarray:
    """Where ``label`` holds target ``organ`` (a label value, or a COMBINED key for several labels)."""
    return np.isin(label, COMBINED[organ][1]) if organ in COMBINED else label == organ


def parse_organs(text: str, any_label: bool = False) -> list[int]:
    """'1,2,3,4' or '2+3' (both kidneys as one target) -> target keys; with ``any_label`` every label
    number is accepted (a single labelled volume of another dataset)."""
    keys = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        if "+" in token:
            labels = tuple(sorted(int(v) for v in token.split("+") if v.strip().isdigit()))
            key = next((k for k, (_, ls) in COMBINED.items() if ls == labels), None)
            if key is None:
                raise UserInputError(f"--organs: '{token}' is not a known combined target; use 2+3 (both kidneys).")
            keys.append(key)
        elif token.isdigit() and (any_label or int(token) in ORGANS):
            keys.append(int(token))
        else:
            raise UserInputError(f"--organs: '{token}' is not one of 1, 2, 3, 4 (liver, right kidney, left kidney, "
                                 "spleen) or 2+3 (both kidneys as one target).")
    if not keys:
        raise UserInputError("--organs is empty; give label numbers such as 1,2,3,4.")
    return keys


def organ_slices(label: np.ndarray, organ: int) -> np.ndarray:
    """Indices (axis 0) of the slices that hold ``organ``."""
    return np.flatnonzero(target_mask(label, organ).any(axis=(1, 2)))


def organ_name(organ: int) -> str:
    """The target's name for reports (``label_N`` for a label that CHAOS does not name)."""
    return TARGET_NAMES.get(organ, f"label_{organ}")
