#!/usr/bin/env bash
# One-call GPU run for issue 8 (H200: Python 3.12, torch 2.11, triton 3.6 preinstalled).
#
#   bash bench/run_gpu.sh            # from the repository root; results under $OUT
#
# 1. `bnrewrite bench` (GPU mode): copy bandwidth, kernel-vs-estimator checks on ResNet-sized bf16
#    shapes, the BN layer table (cuDNN, kernels, torch.compile BN, compiled torch estimator) and the
#    ResNet-50 training step, with its own time budget -> $OUT/bench_h200.json, $OUT/bench.txt
# 2. the kernel test file on CUDA (tests/test_kernels.py runs every case on the GPU when one is
#    visible) with what is left of the budget -> $OUT/pytest_kernels.txt
# 3. $OUT/BENCHMARKS_run.md: the markdown table to paste into BENCHMARKS.md.
# Whole run: about 5 minutes (BNREWRITE_GPU_BUDGET_S, default 290 s); give the call a 480 s timeout.
set -u
OUT=${OUT:-/tmp/bnrewrite-bench}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${BNREWRITE_GPU_BUDGET_S:-290}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# bnrewrite.passes lives in passes/ (package-dir): an editable install without network makes it
# importable; if that fails, PYTHONPATH still serves bnrewrite and bnrewrite.kernels.
if ! "$PY" -c "import bnrewrite.passes" >/dev/null 2>&1; then
  "$PY" -m pip install -e . --no-deps --no-build-isolation -q > "$OUT/pip.txt" 2>&1 \
    || echo "editable install failed (see pip.txt); bnrewrite.passes / the backend may be missing"
fi

BENCH_BUDGET=$(( TOTAL - 80 - ($(date +%s) - START) ))
echo "== bnrewrite bench (budget ${BENCH_BUDGET} s)"
"$PY" -m bnrewrite bench --out "$OUT/bench_h200.json" --budget-s "$BENCH_BUDGET" 2>&1 | tee "$OUT/bench.txt"
echo "bench rc=${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"

LEFT=$(( TOTAL - ($(date +%s) - START) ))
if [ "$LEFT" -lt 45 ]; then LEFT=45; fi
echo "== tests/test_kernels.py on CUDA (timeout ${LEFT} s)"
timeout "$LEFT" "$PY" -m pytest tests/test_kernels.py -q -x -p no:cacheprovider > "$OUT/pytest_kernels.txt" 2>&1
echo "pytest rc=$? (124 = ran out of time)" | tee -a "$OUT/pytest_kernels.txt"
tail -n 15 "$OUT/pytest_kernels.txt"

"$PY" bench/to_markdown.py "$OUT/bench_h200.json" > "$OUT/BENCHMARKS_run.md" 2>&1 || true
cat "$OUT/BENCHMARKS_run.md"
echo "total $(( $(date +%s) - START )) s"
