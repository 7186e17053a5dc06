#!/usr/bin/env bash
# Creates .venv with PyTorch and kilm_ray (editable, with test extras). Idempotent.
# PyTorch: a CPU build on a machine without a GPU, the configured index's build where there is one
# (scripts/install_torch.sh, which says which it chose; TORCH_SPEC and TORCH_INDEX_URL override).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
bash scripts/install_torch.sh .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import kilm_ray, torch, ray, deepspeed, transformers; print('kilm_ray', kilm_ray.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
