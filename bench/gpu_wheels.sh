#!/usr/bin/env bash
# Build the folder bench/gpu_check.sh installs from on an offline GPU machine: wheels (DeepSpeed with no
# ops prebuilt, its pure and compiled dependencies, tensorboard, kilm_ray) and the preprocessed excerpt,
# at most 60 MiB (checked: exits 1 above it). Run it here, where the project venv and a registry are.
#
#   bench/gpu_wheels.sh [OUT=.gpu_bundle] [--python 3.10,3.11,3.12,3.13,3.14] [--platform x86_64|aarch64]
#                       [--no-data] [--no-wheels] [--corpus-mode article|lead]
#
# See bench/gpu_bundle.py for what goes in and why.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" "$REPO/bench/gpu_bundle.py" "$@"
