"""The child processes of ``bench`` (so that their start-up, imports and peak memory are their own):

    python -m fewshotsam_lab.bench_child startup T_PARENT SEGMENT_ARGS...  # `segment` until its first encode
    python -m fewshotsam_lab.bench_child build-ct DATA_DIR OUT_DIR         # write the 512 x 512 x 600 CT case
    python -m fewshotsam_lab.bench_child measure COMMAND...                # run COMMAND, report its peak memory

Each prints one line ``BENCH_<PART> {json}`` (``startup`` on stderr, the others on stdout). Only the
standard library is imported at the top: the ``startup`` figures count the modules that ``segment``
itself imports.
"""

import json
import os
import sys
import time


def startup(t_parent: float, segment_argv: list) -> int:
    """Run the library's command line on ``segment_argv``; at the first slice sent to the encoder, report
    the wall time since ``t_parent`` (the parent's clock before launching this process), this process's
    CPU time and imported modules, and exit."""
    from FewShotSAMLib.sam import SamBackend

    def first_encode(self, frames):
        c = os.times()
        sys.stderr.write("BENCH_STARTUP " + json.dumps({"wall_s": time.time() - t_parent,
                         "cpu_s": c.user + c.system, "modules": len(sys.modules),
                         "timm": "timm" in sys.modules, "torchvision": "torchvision" in sys.modules}) + "\n")
        sys.stderr.flush()
        os._exit(0)

    SamBackend._run_encoder = first_encode
    from FewShotSAMLib.cli import main

    return main(segment_argv)


def build_ct(data_dir: str, out_dir: str) -> int:
    """Write the large CT case (``bench.write_large_ct_case``) and print its description."""
    from pathlib import Path

    from fewshotsam_lab.bench import write_large_ct_case

    print("BENCH_CT " + json.dumps(write_large_ct_case(Path(data_dir), Path(out_dir))))
    return 0


def measure(command: list) -> int:
    """Run ``command`` as this process's only child and print its exit code, stderr tail, wall time and
    peak resident memory (GB)."""
    import resource
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    print("BENCH_MEMORY " + json.dumps({"returncode": proc.returncode, "stderr": proc.stderr[-2000:],
                                        "seconds": time.perf_counter() - t,
                                        "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9}))
    return 0


def main(argv: list) -> int:
    """Dispatch on the first argument (see the module docstring)."""
    part, rest = argv[0], argv[1:]
    if part == "startup":
        return startup(float(rest[0]), rest[1:])
    if part == "build-ct":
        return build_ct(rest[0], rest[1])
    if part == "measure":
        return measure(rest)
    raise SystemExit(f"unknown part {part!r}; use startup, build-ct or measure")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
