#!/usr/bin/env bash
# GPU check of the PyTorch CUDA backend (full preset, random weights): fp16 parity + bench rows, ~5-8 min.
# Runs from the source tree (PYTHONPATH=src, no install, no network); needs torch with CUDA and numpy.
# Results: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/bench.json, $OUT/gpu_check.log.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [extra gpu_check.py options, e.g. --skip parity]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"

{
  echo "# $(date -u +%FT%TZ) $(uname -m) $("$PY" --version 2>&1)"
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/environment.txt"

# The script saves after each step; the timeout keeps a stuck step from eating the device budget.
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
