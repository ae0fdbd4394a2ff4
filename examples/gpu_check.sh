#!/usr/bin/env bash
# The first GPU run (see examples/gpu_check.py): run from the project root on the GPU machine, carrying
# the .whl/ that ../shared/device/wheels.sh downloads here; prints one JSON object on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
PYTHONPATH="/tmp/site:$PWD" exec python3 examples/gpu_check.py "$@"
