#!/usr/bin/env bash
# The GPU proof in one command, for a Linux machine with one NVIDIA GPU that has only PyTorch,
# transformers, tokenizers, safetensors and pyarrow, and no network:
#
#   bench/gpu_check.sh OUT [--bundle DIR] [--budget-s 420] [--stages arch,throughput,...] [--cpu-smoke]
#
# 1. installs the wheel folder built beforehand by bench/gpu_wheels.sh (default .gpu_bundle/ beside this
#    checkout; DeepSpeed, its dependencies, tensorboard, kilm_ray) into a private directory on
#    PYTHONPATH (pip --target, or plain unzipping where pip is missing): the machine's Python is untouched;
# 2. runs bench/gpu_check.py: the six stages within the time budget (default 420 s for the whole command,
#    installation included), writing OUT/gpu_check.json and OUT/gpu_check.md after every stage.
#
# PYTHON picks the interpreter (default python3; "python3 -S" rehearses a bare machine, see
# bench/bare_site.py). --cpu-smoke runs every stage on the CPU with the tiny preset (the test suite does).
set -uo pipefail
STARTED=$(date +%s)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: $0 OUT [--bundle DIR] [--budget-s S] [--stages a,b] [--cpu-smoke]" >&2
  exit 2
fi
OUT="$1"
shift
BUNDLE="${KILM_GPU_BUNDLE:-$REPO/.gpu_bundle}"
SMOKE=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --bundle) BUNDLE="${args[$((i + 1))]}" ;;
    --bundle=*) BUNDLE="${args[$i]#--bundle=}" ;;
    --cpu-smoke) SMOKE=1 ;;
  esac
done
read -r -a PY <<< "${PYTHON:-python3}"
mkdir -p "$OUT"
if [ ! -f "$BUNDLE/bundle.json" ]; then
  echo "gpu_check: no wheel folder at $BUNDLE (build it with bench/gpu_wheels.sh on a machine with a registry)" >&2
  exit 2
fi

# DeepSpeed's JIT builds parse TORCH_CUDA_ARCH_LIST as numbers: "9.0a" fails ("invalid literal for int()").
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="$(printf '%s' "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9]+\.[0-9]+)[a-z]+/\1/g')"
fi

# The wheel folder goes into a private site directory, reused while the folder is unchanged.
PYTAG=$("${PY[@]}" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || { echo "gpu_check: ${PY[*]} does not run" >&2; exit 2; }
STAMP=$(sha256sum "$BUNDLE/bundle.json" | cut -c1-12)
SITE="${KILM_GPU_SITE:-${TMPDIR:-/tmp}/kilm_gpu_site/$PYTAG-$STAMP}"
if [ "$(cat "$SITE/.installed" 2> /dev/null)" != "$STAMP" ]; then
  rm -rf "$SITE"
  mkdir -p "$SITE"
  if "${PY[@]}" -m pip --version > /dev/null 2>&1; then
    "${PY[@]}" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
      --find-links "$BUNDLE/wheels" --target "$SITE" -r "$BUNDLE/wheels/requirements.txt" \
      || { echo "gpu_check: installing $BUNDLE/wheels failed" >&2; exit 3; }
  else
    "${PY[@]}" "$REPO/bench/gpu_check.py" --unpack-wheels "$BUNDLE/wheels" "$SITE" \
      || { echo "gpu_check: unpacking $BUNDLE/wheels failed" >&2; exit 3; }
  fi
  "${PY[@]}" "$REPO/bench/gpu_check.py" --restore-mtimes "$BUNDLE/wheels" "$SITE" || true
  echo "$STAMP" > "$SITE/.installed"
fi
echo "gpu_check: wheels from $BUNDLE in $SITE ($(( $(date +%s) - STARTED )) s)"

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"  # ninja, for DeepSpeed's JIT builds
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(dirname "$SITE")/torch_extensions}"
if [ "$SMOKE" = 1 ]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi

# Said before any stage starts, not by five failed stages: what the machine itself must have.
MISSING=$("${PY[@]}" -c '
import importlib.util as u
print(" ".join(m for m in ("torch", "transformers", "tokenizers", "safetensors", "pyarrow") if u.find_spec(m) is None))')
if [ -n "$MISSING" ]; then
  echo "gpu_check: this machine lacks $MISSING (every stage but arch needs them; the wheel folder carries" \
       "DeepSpeed and kilm_ray only): install them, or add them to the folder (bench/gpu_wheels.sh)" >&2
  exit 2
fi

exec "${PY[@]}" "$REPO/bench/gpu_check.py" "$OUT" --bundle "$BUNDLE" --started-at "$STARTED" "$@"
