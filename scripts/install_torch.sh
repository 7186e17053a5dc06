#!/usr/bin/env bash
# Installs PyTorch into the virtual environment of $1 (default .venv) and says which build it chose.
#
# Where `nvidia-smi` sees a GPU: TORCH_SPEC (default torch==2.13.0) from the configured index (PyPI's is a CUDA
# build). Without a GPU: a CPU build, namely the configured index's wheel when it is one (a local `+cpu`
# wheel, or one that needs no nvidia-* packages), else PyTorch's CPU wheel index (TORCH_CPU_INDEX_URL),
# instead of GBs of CUDA wheels (PyPI's default torch for Linux brought `+cu130` on Python 3.12 and 3.13).
# TORCH_INDEX_URL forces an index. An installed torch is kept. V100 (sm_70) needs a CUDA 12.x build:
# install it first (cluster.yaml's setup_commands show how).
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# The wheel pip would take for the spec: "version url cuda|no-cuda" (a dry run: nothing is installed).
candidate() {
  "${PIP[@]}" install --dry-run --quiet --no-deps --ignore-installed --report - "$TORCH_SPEC" 2>/dev/null |
    "$PY" -c 'import json, sys
i = json.load(sys.stdin)["install"][0]
nvidia = any(r.startswith("nvidia-") for r in i["metadata"].get("requires_dist") or [])
print(i["metadata"]["version"], i["download_info"]["url"], "cuda" if nvidia else "no-cuda")'
}

if "$PY" -c "import torch" 2>/dev/null; then
  why="already installed"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  why="from TORCH_INDEX_URL=$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" install -q "$TORCH_SPEC"
  why="a GPU is present ($(nvidia-smi -L | head -1)), so the configured index's build"
else
  read -r version url needs < <(candidate || echo "unknown none cuda")
  if [[ "$version" == *+cpu* || "$needs" == no-cuda ]]; then
    "${PIP[@]}" install -q "$TORCH_SPEC"
    why="no GPU found; the configured index has a CPU build ($url)"
  else
    "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$CPU_INDEX"
    why="no GPU found and the configured index offers a CUDA build ($version), so PyTorch's CPU index $CPU_INDEX"
  fi
fi
echo "torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA %s build)" % torch.version.cuda if torch.version.cuda else "(CPU build)")'): $why"
