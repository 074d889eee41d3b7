#!/usr/bin/env bash
# One run on a GPU machine: the GPU tests, a short pretraining run, then the benchmarks; results in
# $OUT. Bounded at about 9.5 minutes (each step has its own timeout), most important steps first.
#   OUT=/tmp/results bash benchmarks/run_gpu.sh
# ARCHIVE=path.tar.gz also packs $OUT into one file after every step (for a runner that brings back
# few files, or only what was written before it was stopped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pack() { [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$OUT" . ; return 0; }

# Install without touching the machine's packages (it may have no network). Where that fails, or
# maps no fastmae.kernels <- kernels/ (an older setuptools without build isolation; the checkout's own
# fastmae/ comes first on sys.path either way), run from a copy laid out as the installed package.
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "pip install failed" >>"$OUT/install.log"
if ! python -c "import fastmae.kernels" 2>/dev/null; then
  OUT=$(cd "$OUT" && pwd)
  copy=$(mktemp -d)
  cp -r . "$copy/repo" && mv "$copy/repo/kernels" "$copy/repo/fastmae/kernels"
  [ -d ../shared ] && ln -s "$(cd .. && pwd)/shared" "$copy/shared"
  cd "$copy/repo" && echo "fastmae.kernels not importable from the install; running from $copy/repo" | tee -a "$OUT/install.log"
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
pack

# the native backend's CUDA library (for the visible GPU's architecture), built outside the timed steps
timeout 120 python -m fastmae.ops.native --cuda 2>&1 | tail -n 20 | tee "$OUT/native-build.txt"
pack

# this one alone first: a crash in it takes a whole xdist worker down without its traceback
timeout 60 python -m pytest "tests/test_native.py::test_out_of_range_indices_raise" -q -p no:cacheprovider -p no:xdist 2>&1 \
  | tail -n 60 >"$OUT/gpu-test-out-of-range.txt"

# every test that runs a kernel or the model on the GPU (the CPU-only ones are CI's)
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 140 python -m pytest tests/test_ops.py tests/test_kernels.py tests/test_native.py tests/test_parity.py \
  tests/test_attention.py tests/test_model.py -q -p no:cacheprovider $xdist -rfE 2>&1 | tail -n 60 | tee "$OUT/gpu-tests.txt"
pack

# the main job, briefly: one epoch of the default pretraining on the GPU (bf16, fused AdamW)
timeout 45 python -m fastmae.pretrain --epochs 1 --output_dir "$OUT/pretrain" 2>&1 | tail -n 25 | tee "$OUT/pretrain.txt"
rm -rf "$OUT/pretrain"
pack

# one JSON per suite, each under its own time limit, so that a slow suite cannot cost the others
for suite in ${SUITES:-kernels:75 e2e:75 speedup:75 attention:35}; do
  name=${suite%%:*}
  timeout "${suite##*:}" python -m pytest "benchmarks/test_bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench-$name.json" --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 40 >"$OUT/bench-$name.txt"
  pack
done
python benchmarks/summarize.py "$OUT"/bench-*.json --png "$OUT/chart.png" | tee "$OUT/summary.md"
pack
