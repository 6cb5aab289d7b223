"""Command line: argument parsing and output only; the work is done by the library's modules.

One subcommand: ``segment`` (the main job). The research commands that it once had (evaluate, bench,
train, demo) are the lab's, in a source checkout: ``python tools/lab.py COMMAND``; naming one here
says so in one sentence.
The FEWSHOTSAM_* environment variables are read here, once (``RuntimeOptions.from_environment``), and the
options passed down to the backend, the cache and the session.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable, Optional, Sequence

from .errors import CancelledError, UserInputError

log = logging.getLogger("FewShotSAMLib")

# Subcommands of earlier versions, now research tooling -> their command in the lab (tools/lab.py).
MOVED_TO_LAB = {"evaluate": "evaluate", "bench": "bench", "train": "train-fob", "demo": "demo"}


def parse_window(text: Optional[str]) -> Optional[tuple[float, float]]:
    """'C,W' -> (centre, width)."""
    if not text:
        return None
    try:
        c, w = (float(v) for v in text.split(","))
    except ValueError:
        raise UserInputError(f"--window takes CENTRE,WIDTH in HU, e.g. --window 40,400; got '{text}'.") from None
    return c, w


def parse_range(text: str):
    """'auto' or 'Z0:Z1' (inclusive) -> 'auto' | (z0, z1)."""
    if text in (None, "", "auto"):
        return "auto"
    try:
        a, b = text.split(":")
        z0, z1 = int(a), int(b)
    except ValueError:
        raise UserInputError(f"--range takes 'auto' or FIRST:LAST slice numbers, e.g. --range 10:30; got '{text}'.") from None
    if z0 > z1:
        raise UserInputError(f"--range {text}: the first slice must not be after the last.")
    return z0, z1


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``segment`` subcommand."""
    from .prompts import DEFAULT_GENERATOR
    from .sam.names import BACKEND_NAMES, DEFAULT_SAM

    p.add_argument("image", help="CT/MRI volume: NIfTI, NRRD, MHA, or a DICOM series folder.")
    p.add_argument("--example", required=True, help="Label map in the image's geometry with the target painted on one or a few slices.")
    p.add_argument("--output", required=True, help="Output label map (same geometry as IMAGE).")
    p.add_argument("--label", type=int, default=None, help="Label value of the target in EXAMPLE (needed when it holds several).")
    p.add_argument("--prompts-out", default=None, help="Write the per-slice prompts fed to SAM as JSON.")
    p.add_argument("--prompts-in", default=None, help="Re-run SAM from an (edited) prompts JSON instead of generating prompts.")
    p.add_argument("--previous", default=None,
                   help="With --prompts-in: the segmentation being corrected (e.g. the run's --output); a SAM "
                        "that reads it (litemedsam-points) then changes each clicked slice near its points. For "
                        "added points: a deleted or moved point's change stays in it, so re-run those without --previous.")
    p.add_argument("--overlay-out", default=None, help="Write a PNG montage of the result for a quick visual check.")
    p.add_argument("--generator", default=DEFAULT_GENERATOR,
                   help="Prompt generator: auto (default: the one that measured best with the SAM model; FoB inside "
                        "the propagation for litemedsam-points, box propagation otherwise), fob, boxprop, persam, "
                        "p2sam, synpo or coarse.")
    p.add_argument("--fob-mode", default=None,
                   help="With --generator fob: box+bg, box+points, box or points prompt every slice from the painted "
                        "slice alone with FoB's ring box and points, instead of from its neighbour (propagate, the "
                        "default). Better where the neighbours look like the target (vertebrae 71 vs 55 Dice), worse "
                        "elsewhere (docs/FOB.md).")
    p.add_argument("--sam", default=DEFAULT_SAM, help=f"SAM model: {', '.join(BACKEND_NAMES)} (default {DEFAULT_SAM}; "
                   "litemedsam-points follows points; vit_t is MobileSAM, obtained and verified on first use), or a checkpoint path.")
    p.add_argument("--sam-checkpoint", default=None, help="Checkpoint for --sam NAME: a local path, hf:owner/repo/file or owner/repo:file.")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda.")
    p.add_argument("--range", default="auto", help="'auto' (find the target's extent) or FIRST:LAST slice numbers along the slicing axis.")
    p.add_argument("--window", default=None, help="CT window CENTRE,WIDTH in HU (default: soft tissue 40,400 for CT).")
    p.add_argument("--cache-dir", default=None, help="Keep slice embeddings in this folder so later runs on the same volume skip the encoder.")
    p.add_argument("--quiet", action="store_true", help="No progress bar or log lines; only errors.")


def _return_freed_memory_to_the_system() -> None:
    """With glibc, serve blocks of 128 KiB and more from mmap so that freeing them returns the memory.

    glibc raises that threshold as large blocks are freed; the encoder's transient buffers then come from
    the heap, which fragments and keeps the process's resident memory high on a large CT (docs/PERFORMANCE.md
    has the figure). Set only for the command-line job, whose process is ours; other platforms: no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (glibc's malloc.h); fixing it also stops the raise
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return


def run_segment(args: argparse.Namespace) -> int:
    """The main job: read, segment, write. Returns the exit code."""
    import numpy as np

    _return_freed_memory_to_the_system()

    from .options import RuntimeOptions
    from .volume import check_output_path, label_on_image_grid, read_volume, select_example, write_label

    t0 = time.perf_counter()
    options = RuntimeOptions.from_environment()  # the FEWSHOTSAM_* variables: read here, passed down
    check_output_path(args.output, "output")
    for path, what in ((args.prompts_out, "prompts output"), (args.overlay_out, "overlay output")):
        if path:
            check_output_path(path, what)
    extent = parse_range(args.range)
    window = parse_window(args.window)
    image = read_volume(args.image, "image")
    example_vol = read_volume(args.example, "example")
    example_labels = label_on_image_grid(image, example_vol)
    example = select_example(example_labels, args.label)
    label_value = int(args.label) if args.label is not None else int(example_labels[example].flat[0])
    del example_vol, example_labels  # only the boolean example is needed from here (memory on large volumes)
    generator = args.generator
    if args.fob_mode:
        if args.prompts_in or str(args.generator).lower() != "fob":
            raise UserInputError("--fob-mode goes with --generator fob (and without --prompts-in).")
        from .prompts import make_generator

        # an unknown mode is its one-sentence error here, before the SAM model loads
        generator = make_generator("fob", sam=args.sam, mode=args.fob_mode)
    previous = None
    if args.previous:
        if not args.prompts_in:
            raise UserInputError("--previous is the segmentation a --prompts-in re-run corrects; pass --prompts-in too.")
        previous = label_on_image_grid(image, read_volume(args.previous, "previous segmentation")) != 0

    from .engine import VolumeSession
    from .volume import choose_intensity

    intensity = choose_intensity(image.array, image.metadata, window)
    log.info("intensities: %s", intensity.describe())
    from .sam import load_backend

    backend = load_backend(args.sam, args.device, args.sam_checkpoint, options=options)
    cache = None
    if args.cache_dir:
        from .sam.cache import EmbeddingCache

        cache = EmbeddingCache(backend, persist_dir=args.cache_dir, options=options)
    session = VolumeSession(image.array, image.spacing, sam=backend, intensity=intensity, cache=cache,
                            options=options)
    log.info("SAM %s on %s", session.backend.name, session.backend.device)

    from tqdm import tqdm

    bar = tqdm(total=0, unit="slice", disable=args.quiet, file=sys.stderr, desc="segmenting")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        if args.prompts_in:
            from .prompt_file import read_prompts

            axis, prompts = read_prompts(args.prompts_in, image)
            result = session.segment_from_prompts(example, axis, prompts, previous=previous, progress=progress)
        else:
            result = session.segment(example, generator=generator, extent=extent, progress=progress,
                                     release_embeddings=True)
    finally:
        bar.close()

    sam_name = session.backend.name
    session.cache.close()  # embeddings are not needed any more: free them (and any spill folder) before writing
    del session, cache
    dtype = np.uint8 if 0 <= label_value <= 255 else np.int32
    labels_out = result.mask.astype(dtype)
    labels_out *= dtype(label_value)  # in place: one volume-sized array, not two
    write_label(image, labels_out, args.output)
    del labels_out
    if args.prompts_out:
        from .prompt_file import prompts_to_json, write_prompts

        write_prompts(args.prompts_out, prompts_to_json(
            result, image, image=str(args.image), example=str(args.example), label=label_value,
            sam=sam_name, generator=result.generator or "prompts-in"))
    if args.overlay_out:
        from .overlay import render_overlay, write_overlay

        write_overlay(args.overlay_out, render_overlay(image.array, image.spacing, intensity, result))
    ml = float(result.mask.sum() * np.prod(image.spacing) / 1000.0)
    if not args.quiet:
        print(f"segmented {len(result.segmented_slices)} slices (axis {result.axis}, painted {result.painted}), "
              f"volume {ml:.1f} ml, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="python -m FewShotSAMLib",
                                     description="Segment a whole CT/MRI volume from one painted slice with SAM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_segment_arguments(sub.add_parser("segment", help="Segment a volume from a painted example (the main job)."))
    return parser


def moved_to_lab(argv: Sequence[str]) -> Optional[str]:
    """The one-sentence error for a research subcommand that moved to the lab, or None."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in MOVED_TO_LAB:
        return None
    return (f"'{command}' is research tooling and no longer part of the installed library; from a source "
            f"checkout run: python tools/lab.py {MOVED_TO_LAB[command]} ...")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m FewShotSAMLib``; returns the exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    moved = moved_to_lab(argv)
    if moved:
        print(f"error: {moved}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else (logging.ERROR if quiet else logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return exit_code_of(lambda: run_segment(args), "; nothing was written")


def exit_code_of(job: Callable[[], int], stopped_note: str = "") -> int:
    """Run a command-line job: an error the user can fix is one ``error: ...`` line and its exit code, a
    cancel or an interrupt one line (``stopped_note`` appended) and 130."""
    try:
        return int(job() or 0)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except CancelledError:
        print(f"cancelled{stopped_note}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"interrupted{stopped_note}", file=sys.stderr)
        return 130
