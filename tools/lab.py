#!/usr/bin/env python
"""The research tooling of FewShotSAM, from a source checkout (not installed by pip nor by the Slicer build):

    python tools/lab.py evaluate ...      # the CHAOS protocols (fewshot, product, clicks)
    python tools/lab.py bench ...         # encoder / generator / decoder speed and memory
    python tools/lab.py train-fob ...     # self-supervised training of the FoB prompt generator
    python tools/lab.py demo              # the main job on a real MRI shipped by nilearn
    python tools/lab.py --help            # every command

The commands live in ``tools/fewshotsam_lab/`` (see ``fewshotsam_lab/cli.py``); they use the library
``FewShotSAMLib`` of this checkout.
"""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
for path in (TOOLS, TOOLS.parent):  # fewshotsam_lab, and the library of this checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fewshotsam_lab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
