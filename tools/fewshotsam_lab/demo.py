"""``python tools/lab.py demo``: the main job, offline, on a real MRI that an installed package ships.

The volume is the MNI ICBM152 2009a T1 template bundled with the nilearn wheel, resampled to 2 mm; the
target is the brain as a clinician would outline it: grey + white matter probability >= 50 % (the
template's own tissue maps) with the enclosed ventricles and sulci filled slice by slice, largest 3D
component. One axial slice through its middle is painted; the rest is found automatically and compared with
the reference.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from FewShotSAMLib.errors import UserInputError

log = logging.getLogger(__name__)

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GREY = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WHITE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def nilearn_data_dir() -> Path:
    """Folder of the data files inside the installed nilearn package."""
    try:
        import nilearn.datasets
    except ImportError as exc:
        raise UserInputError("The demo needs nilearn (it ships the MRI it uses): pip install nilearn.") from exc
    return Path(nilearn.datasets.__file__).parent / "data"


def load_demo_volume(spacing_mm: float = 2.0):
    """(image Volume, reference brain mask) resampled to ``spacing_mm`` isotropic."""
    import SimpleITK as sitk

    from FewShotSAMLib.volume import _from_sitk

    folder = nilearn_data_dir()
    images = [sitk.ReadImage(str(folder / name), sitk.sitkFloat32) for name in (TEMPLATE, GREY, WHITE)]
    ref = images[0]
    size = [int(round(sz * sp / spacing_mm)) for sz, sp in zip(ref.GetSize(), ref.GetSpacing())]
    resampled = [sitk.Resample(im, size, sitk.Transform(), sitk.sitkLinear, ref.GetOrigin(), (spacing_mm,) * 3,
                               ref.GetDirection(), 0.0, sitk.sitkFloat32) for im in images]
    image = _from_sitk(resampled[0])
    from scipy import ndimage

    tissue = (sitk.GetArrayFromImage(resampled[1]) + sitk.GetArrayFromImage(resampled[2])) >= 127.5
    brain = np.stack([ndimage.binary_fill_holes(s) for s in tissue])
    labels, n = ndimage.label(brain)
    if n > 1:
        brain = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return image, brain


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``demo`` subcommand."""
    p.add_argument("--out", default="demo_output", help="Folder for the outputs (created if missing).")
    p.add_argument("--generator", default=None, help="Prompt generator (default: the library's default).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--spacing", type=float, default=2.0, help="Resampling of the template in mm (default 2).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    """Segment the template's brain from one painted slice, write outputs, print Dice."""
    from tqdm import tqdm

    from FewShotSAMLib.engine import VolumeSession
    from FewShotSAMLib.overlay import render_overlay, write_overlay
    from FewShotSAMLib.prompt_file import prompts_to_json, write_prompts
    from FewShotSAMLib.prompts import DEFAULT_GENERATOR
    from FewShotSAMLib.volume import painted_slices, write_label

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, reference = load_demo_volume(args.spacing)
    axial = 0
    zs = painted_slices(reference, axial)
    mid = int(zs[len(zs) // 2])
    example = np.zeros_like(reference)
    example[mid] = reference[mid]
    import SimpleITK as sitk

    from FewShotSAMLib.volume import atomic_write, to_sitk

    atomic_write(out / "image.nii.gz", lambda tmp: sitk.WriteImage(to_sitk(image), tmp, True))
    write_label(image, example.astype(np.uint8), out / "example.nii.gz")
    write_label(image, reference.astype(np.uint8), out / "reference.nii.gz")

    t0 = time.perf_counter()
    session = VolumeSession(image.array, image.spacing, device=args.device)
    bar = tqdm(total=0, unit="slice", disable=args.quiet, desc="segmenting")

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    generator = args.generator or DEFAULT_GENERATOR
    try:
        result = session.segment(example, generator=generator, progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    write_label(image, result.mask.astype(np.uint8), out / "segmentation.nii.gz")
    write_prompts(out / "prompts.json", prompts_to_json(result, image, image=str(out / "image.nii.gz"),
                                                        label=1, sam=session.backend.name, generator=generator))
    write_overlay(out / "overlay.png", render_overlay(image.array, image.spacing, session.intensity, result,
                                                      reference=reference))
    dice = 200.0 * (result.mask & reference).sum() / (result.mask.sum() + reference.sum())
    seg = result.segmented_slices
    print(f"demo: MNI152 T1 template ({image.array.shape[::-1]} voxels at {args.spacing:g} mm), brain painted on "
          f"axial slice {mid}; segmented slices {seg[0]}-{seg[-1]} (reference {zs[0]}-{zs[-1]}); "
          f"Dice {dice:.1f} %; {seconds:.0f} s on {session.backend.device}; outputs in {out}/")
    return 0
