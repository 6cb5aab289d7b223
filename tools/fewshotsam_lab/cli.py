"""``python tools/lab.py COMMAND ...``: the one dispatcher of the research tooling.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``, imported
only when used (the library's ``python -m FewShotSAMLib`` keeps only ``segment``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from FewShotSAMLib.cli import exit_code_of

PROG = "python tools/lab.py"

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "evaluate": ("fewshotsam_lab.evaluate", "Evaluate prompt generators on CHAOS (few-shot or product protocol)."),
    "bench": ("fewshotsam_lab.bench", "Measure encoder, generator and decoder speed and memory."),
    "train-fob": ("fewshotsam_lab.fob_training.train",
                  "Train the FoB prompt generator self-supervised on unlabeled volumes."),
    "train-point-decoder": ("fewshotsam_lab.point_decoder",
                            "Fine-tune LiteMedSAM's prompt encoder and mask decoder to follow points."),
    "calibrate-fob-extent": ("fewshotsam_lab.fob_extent",
                             "Choose FoB's end-of-target threshold for propagation on the product protocol."),
    "precompute-embeddings": ("fewshotsam_lab.precompute",
                              "Fill the persistent embedding cache for every CHAOS volume."),
    "bench-slicer-rerun": ("fewshotsam_lab.slicer_rerun",
                           "Re-run latency of one slice after a point edit through the Slicer module's MRML code."),
    "demo": ("fewshotsam_lab.demo", "Segment the liver of a real labelled CT that the demo obtains from a PyPI wheel (Dice against its reference)."),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (each command's module is imported only for its own options)."""
    parser = argparse.ArgumentParser(prog=PROG, description="FewShotSAM research tooling (not installed).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python tools/lab.py``; returns the exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    module_name, description = COMMANDS[args.command]

    def job() -> int:
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f"{PROG} {args.command}", description=description)
        module.add_arguments(sub)
        return module.run(sub.parse_args(rest))

    return exit_code_of(job)
