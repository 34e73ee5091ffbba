#!/usr/bin/env bash
# One-call GPU run for issue 8 (H200: Python 3.12, torch 2.11, triton 3.6 preinstalled).
#
#   bash bench/run_gpu.sh            # from the repository root; ~5 min; results under $OUT
#   bash bench/run_gpu.sh extra      # optional second call: compiled-BN layer rows, the other
#                                    # ResNet-50 variants and the tuning pass (~5 min)
#
# main: `bnrewrite bench` -- copy bandwidth, kernel-vs-estimator checks on ResNet-sized bf16 shapes,
#   the BN layer table (cuDNN and the fused kernels on all 12 ResNet-50 BN shapes), the ResNet-50
#   step (compiled plain BN vs backend="bnrewrite" lowering="kernels" BS 1/8 vs the fused modules),
#   then, within its budget, torch.compile'd BN
#   rows, the other ResNet-50 variants and tuning -> $OUT/bench_h200.json, $OUT/bench.txt;
#   then `bnrewrite bench --sections compiled --no-e2e` (issue 23: Inductor's passes, kernels and
#   time of compiled BN vs the backend's full / bs / fs / ns, per shape, NCHW and channels-last,
#   bf16) -> $OUT/bench_compiled.json, $OUT/bench_compiled.txt;
#   then tests/test_kernels.py and tests/test_lowering_kernels.py on CUDA with the time left
#   -> $OUT/pytest_kernels.txt; the one-NCCL-rank SampledSyncBatchNorm test -> $OUT/pytest_nccl.txt;
#   $OUT/BENCHMARKS_run.md is the section to paste into BENCHMARKS.md.
# Give the device call a 480 s timeout; BNREWRITE_GPU_BUDGET_S (default 300) bounds the run.
set -u
MODE=${1:-main}
OUT=${OUT:-/tmp/bnrewrite-bench}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${BNREWRITE_GPU_BUDGET_S:-300}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%FT%TZ) mode: $MODE"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name())"
} > "$OUT/env_$MODE.txt" 2>&1
cat "$OUT/env_$MODE.txt"

# bnrewrite.passes lives in passes/ (package-dir). From this checkout it imports with no install
# (bnrewrite/_source_checkout.py); the editable install below is the fallback for other layouts.
if ! "$PY" -c "import bnrewrite.passes" >/dev/null 2>&1; then
  "$PY" -m pip install -e . --no-deps --no-build-isolation -q > "$OUT/pip.txt" 2>&1 \
    || echo "editable install failed (see pip.txt); bnrewrite.passes / the backend may be missing"
fi

if [ "$MODE" = "extra" ]; then
  BUDGET=$(( TOTAL - 15 - ($(date +%s) - START) ))
  echo "== bnrewrite bench: compile rows, extra ResNet-50 variants, tuning (budget ${BUDGET} s)"
  "$PY" -m bnrewrite bench --sections compile,e2e-extra,tune --compile all \
    --out "$OUT/bench_h200_extra.json" --budget-s "$BUDGET" 2>&1 | tee "$OUT/bench_extra.txt"
  echo "bench rc=${PIPESTATUS[0]}" | tee -a "$OUT/bench_extra.txt"
  "$PY" bench/to_markdown.py "$OUT/bench_h200_extra.json" > "$OUT/BENCHMARKS_run_extra.md" 2>&1 || true
  cat "$OUT/BENCHMARKS_run_extra.md"
  echo "total $(( $(date +%s) - START )) s"
  exit 0
fi

BENCH_BUDGET=$(( TOTAL - 165 - ($(date +%s) - START) ))
echo "== bnrewrite bench (budget ${BENCH_BUDGET} s)"
"$PY" -m bnrewrite bench --out "$OUT/bench_h200.json" --budget-s "$BENCH_BUDGET" 2>&1 | tee "$OUT/bench.txt"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"

echo "== bnrewrite bench --sections compiled: Inductor's byte count and time of compiled BN vs the backend's lowering (budget 100 s)"
"$PY" -m bnrewrite bench --sections compiled --no-e2e --out "$OUT/bench_compiled.json" --budget-s 100 2>&1 \
  | tee "$OUT/bench_compiled.txt"
echo "bench compiled rc=${PIPESTATUS[0]}" | tee -a "$OUT/bench_compiled.txt"

LEFT=$(( TOTAL - ($(date +%s) - START) ))
if [ "$LEFT" -lt 45 ]; then LEFT=45; fi
echo "== tests/test_kernels.py tests/test_lowering_kernels.py on CUDA (timeout ${LEFT} s)"
timeout "$LEFT" "$PY" -m pytest tests/test_kernels.py tests/test_lowering_kernels.py -q -p no:cacheprovider \
  > "$OUT/pytest_kernels.txt" 2>&1
echo "pytest rc=$? (124 = ran out of time)" | tee -a "$OUT/pytest_kernels.txt"
tail -n 15 "$OUT/pytest_kernels.txt"

echo "== tests/test_distributed.py -k one_rank: SampledSyncBatchNorm over one NCCL rank (timeout 90 s)"
timeout 90 "$PY" -m pytest tests/test_distributed.py -k one_rank -q -p no:cacheprovider \
  > "$OUT/pytest_nccl.txt" 2>&1
echo "pytest rc=$? (124 = ran out of time)" | tee -a "$OUT/pytest_nccl.txt"
tail -n 5 "$OUT/pytest_nccl.txt"

"$PY" bench/to_markdown.py "$OUT/bench_h200.json" > "$OUT/BENCHMARKS_run.md" 2>&1 || true
cat "$OUT/BENCHMARKS_run.md"
echo "total $(( $(date +%s) - START )) s"
