#!/usr/bin/env bash
# GPU check: install (offline), run the whole test suite on CUDA, then the quick benchmarks.
# Usage on the CUDA machine, from the repository root:  bash benchmarks/gpu_check.sh
# Writes logs, CSV, markdown tables and plots under $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
unset TRITON_INTERPRET VARFORMER_BACKEND
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "install"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

stamp "build the C++/CUDA extension (csrc/)"
timeout "${BUILD_TIMEOUT:-300}" python3 -c "from varformer.ops import _ext; print('cpu', _ext.cpu_status()); print('cuda', _ext.cuda_status())" \
  2>&1 | tee "$OUT/build_ext.log"

stamp "tests (CUDA; the ahead-of-time compile check runs on the CPU machines)"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q $xdist -p no:cacheprovider --benchmark-disable \
  -W ignore::DeprecationWarning --deselect tests/ops/test_gpu_compile.py tests \
  >"$OUT/tests.log" 2>&1
test_rc=$?
tail -n 25 "$OUT/tests.log"

stamp "stage timings"
timeout "${STAGE_TIMEOUT:-45}" python3 benchmarks/profile_mediator_attention.py 2>&1 | tee "$OUT/stages.txt"

stamp "quick benchmarks"
timeout "${BENCH_TIMEOUT:-240}" varformer bench --quick --device cuda --out "$OUT" \
  >"$OUT/bench.log" 2>"$OUT/bench.err"
bench_rc=$?
tail -n 5 "$OUT/bench.err"

stamp "short fused training run (released-size model, paper stage 2, synthetic data, bf16)"
timeout "${TRAIN_TIMEOUT:-240}" varformer train configs/gpu_smoke.yml --out "$OUT/train" \
  >"$OUT/train.log" 2>&1
train_rc=$?
tail -n 5 "$OUT/train.log"

stamp "data loader throughput (4 workers) next to the step time"
timeout "${DATA_TIMEOUT:-90}" python3 -m varformer.benchmarks.bench_data --workers 0,4 \
  2>&1 | tee "$OUT/data_loader.md"

stamp "summary"
echo "tests rc=$test_rc  bench rc=$bench_rc  train rc=$train_rc"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
grep -E "^\| (mediator|window|vq|model)" "$OUT/bench.log" | awk -F'|' '{printf "%-24s %-8s %-18s %-9s %10s %8s %8s %9s %6s\n", $3, $4, $5, $6, $7, $8, $9, $10, $13}' | sed 's/([^)]*)//'
