#!/usr/bin/env bash
# One run on a GPU machine: the cuda-marked tests, then the benchmarks; results in $OUT.
# Bounded at about 9.5 minutes (each step has its own timeout; the native build takes ~1 minute).
#   OUT=/tmp/results bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"

# Install without touching the machine's packages (it may have no network); fall back to a copy
# on PYTHONPATH laid out as the installed package (fastmae.kernels <- kernels/).
if ! pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  shim=$(mktemp -d)
  cp -r fastmae "$shim/" && cp -r kernels "$shim/fastmae/kernels"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed (see install.log); using $shim" | tee -a "$OUT/install.log"
fi

# Optional wheels carried to the machine (e.g. xformers, which installs beside an existing torch)
for whl in wheels/*.whl; do
  [ -e "$whl" ] && pip install -q --no-deps "$whl" >>"$OUT/install.log" 2>&1
done

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU (nvidia-smi not found)"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -m fastmae.ops
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# the native backend's CUDA library, built here rather than inside a timed step
timeout 240 python -m fastmae.ops.native --cuda 2>&1 | tail -n 20 | tee "$OUT/native-build.txt"
timeout 120 python -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/cuda-tests.txt"

# one JSON per suite, each under its own time limit, so that a slow suite cannot cost the others
for suite in kernels:80 attention:45 speedup:80 e2e:80 data:45; do
  name=${suite%%:*}
  timeout "${suite##*:}" python -m pytest "benchmarks/test_bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench-$name.json" --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 40 >"$OUT/bench-$name.txt"
done
python benchmarks/summarize.py "$OUT"/bench-*.json --png "$OUT/chart.png" | tee "$OUT/summary.md"
