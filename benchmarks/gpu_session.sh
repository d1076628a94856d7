#!/usr/bin/env bash
# Every GPU check of the project in one call (device time is scarce: a lent GPU session has ~15 minutes,
# machine start included), from the source tree with the device image's own torch/triton/onnx (no install):
#
#   1. benchmarks/gpu_check.py      torch CUDA backend: fp16 parity vs the fp32 CPU reference, `facemoe bench`
#                                   rows (CUDA graphs on/off, sparse fp32 baseline), precision variants,
#                                   `facemoe bench --compile --half all` rows
#   2. benchmarks/moe_kernel_gpu.py Triton sparse-MoE kernels: correctness sweep, per-block and whole-model timing
#   3. benchmarks/gpu_attention.py  window attention modes (matmul / sdpa / flex, eager and compiled) per stage
#   4. pytest -m gpu                the CUDA tests that CI skips, and the kernel tests on real hardware
#   Calls of their own (PARTS=...): gpu_moe (benchmarks/gpu_moe.py: top-2 expert compute, dense vs Triton vs
#   PyTorch grouped GEMM per block and whole model, accuracy, bench rows) and packages (stored compiled models).
#
# Each part has its own time limit (580 s in all) so the summary and the logs are written before the call's
# 600 s limit. On an H200 (2026-11-28) the script took 182 s before the compiled rows were added; compiling
# costs 25-30 s per batch size and variant (measured), so expect about twice that now.
# Writes into $OUT (at most 8 files come back from the device): gpu_check.{json,md}, bench{,_compiled}.json,
# moe_kernel.{json,md}, gpu_attention.json, logs.tgz (every log and the environment). Prints both Markdown reports last.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh          # T_CHECK, T_KERNEL, T_ATTN, T_TESTS: limits (s)
#   PARTS=gpu_moe OUT=/tmp/out bash benchmarks/gpu_session.sh   # only the expert-compute run (T_MOE, 420 s):
#     gpu_moe.{json,md}, bench_moe.json, logs.tgz (within the 8 files)
#   OUT=/tmp/out PARTS=packages bash benchmarks/gpu_session.sh   # stored compiled packages alone (one call):
#     benchmarks/gpu_packages.py: compile time, load time in a fresh process, bench rows 1/8/64/256 loading the
#     package (bench_package.json), cosine vs the fp32 CPU reference and routing agreement -> gpu_packages.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"

pack_logs() { tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
trap pack_logs EXIT

{
  echo "# $(date -u +%FT%TZ) $(uname -m) $("$PY" --version 2>&1) nproc=$(nproc)"
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
} >"$LOGS/environment.txt" 2>&1
cat "$LOGS/environment.txt"

part() {  # part NAME LIMIT_S COMMAND...: run with a limit, log to $LOGS/NAME.log, one status line
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
  [ "$rc" -eq 0 ] || tail -n 15 "$LOGS/$name.log"
}

PARTS="${PARTS:-check kernel attention tests}"
want() { [[ " $PARTS " == *" $1 "* ]]; }

if want packages; then  # a call of its own: compiling the full model takes minutes
  part packages "${T_PACKAGES:-540}" "$PY" benchmarks/gpu_packages.py --out "$OUT" --batch 1,8,64,256
  cat "$OUT/gpu_packages.json" 2>/dev/null
fi
want gpu_moe && part gpu_moe "${T_MOE:-420}" "$PY" benchmarks/gpu_moe.py --out "$OUT"
want check && part gpu_check "${T_CHECK:-280}" "$PY" benchmarks/gpu_check.py --out "$OUT"
want kernel && part moe_kernel "${T_KERNEL:-150}" "$PY" benchmarks/moe_kernel_gpu.py --out "$OUT" --iters 10
want attention && part attention "${T_ATTN:-50}" "$PY" benchmarks/gpu_attention.py --out "$OUT" --batch 1,8,64,256 --iters 10
want tests && part pytest_gpu "${T_TESTS:-100}" "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
  tests/test_moe_kernel.py tests/test_backends.py::test_torch_cuda_fp16_graphs_match_eager \
  tests/test_backends.py::test_torch_cuda_compiled_whole_fp16_matches_eager tests/test_model.py::test_cuda_fp16_and_autocast
want tests && [ -f "$LOGS/pytest_gpu.log" ] && grep -E "passed|failed|error" "$LOGS/pytest_gpu.log" | tail -n 3

for report in gpu_check.md moe_kernel.md gpu_moe.md; do
  [ -f "$OUT/$report" ] && cat "$OUT/$report"
done
