#!/usr/bin/env bash
# Creates .venv with PyTorch and kilm_ray (editable, with test extras). Idempotent.
# TORCH_SPEC picks the torch build (default torch==2.13.0: a CPU build where the machine provides one;
# on a GPU machine install the CUDA build you need first, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import kilm_ray, torch, ray, deepspeed, transformers; print('kilm_ray', kilm_ray.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
