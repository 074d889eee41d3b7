#!/usr/bin/env bash
# One run on a GPU machine, most important first, each step under its own time limit and all of them
# within BUDGET seconds (default 540): the GPU tests, the MAE kernels at ViT-L/16 batch 256, a short
# pretraining run, the training step side by side with the original, the graphed step's profile, the
# host's cost per step, the eager step's profile, then the other suites. Results in $OUT; a suite stopped
# at its limit leaves the rows it finished in bench-<suite>.rows.jsonl (its JSON comes at its end).
#   OUT=/tmp/results bash benchmarks/run_gpu.sh
# ARCHIVE=path.tar.gz also packs $OUT into one file after every step (for a runner that brings back
# few files, or only what was written before it was stopped). SUITES overrides the benchmark suites
# run at the end ("kernels:75 speedup:60 attention:30 data:90"; kernels there: the rows not run
# before, ViT-B's, the host's per op, the PTX table); E2E the e2e cases (preset:batch,...).
set -uo pipefail
BUDGET=${BUDGET:-540}
# limit SECONDS: the step's own limit, or what is left of the budget (0: skip the step)
limit() { local left=$((BUDGET - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 20 ? left : 0)) || echo "$1"; }
run() { local t; t=$(limit "$1"); shift; if [ "$t" -gt 0 ]; then timeout "$t" "$@"; else echo "skipped (budget): $*"; fi; }
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
# one compilation cache for every step: the e2e suite's compiled step is the profile's
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fastmae-inductor-cache}
pack() { [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$OUT" . ; return 0; }
# bench NAME SECONDS ARGS...: one benchmark run into bench-NAME.json, its console table in
# bench-NAME.txt; stopped at its limit, the rows it finished stay in bench-NAME.rows.jsonl. What
# this run wrote is summarized at the end (not older files in a reused $OUT).
RESULTS=()
bench() {
  local name=$1 t=$2 rows="$OUT/bench-$1.rows.jsonl"; shift 2
  rm -f "$rows" "$OUT/bench-$name.json"
  run "$t" env FASTMAE_BENCH_ROWS="$rows" python -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench-$name.json" --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 40 >"$OUT/bench-$name.txt"
  if [ -s "$OUT/bench-$name.json" ]; then
    rm -f "$rows"
    RESULTS+=("$OUT/bench-$name.json")
  elif [ -s "$rows" ]; then
    RESULTS+=("$rows")
  fi
  pack
}

# fastmae/kernels and fastmae/csrc are links to kernels/ and csrc/: put back where a copy of the tree
# lost them (or turned them into text files)
for link in kernels csrc; do
  [ -d "fastmae/$link" ] || { rm -f "fastmae/$link"; ln -s "../$link" "fastmae/$link"; }
done
# Install without touching the machine's packages (it may have no network); where that fails, the
# checkout itself on the path imports as it is.
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  echo "pip install failed: running from the checkout on PYTHONPATH" >>"$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
python -c "import fastmae.kernels" >>"$OUT/install.log" 2>&1 || echo "fastmae.kernels does not import (see above)" >>"$OUT/install.log"

# Optional wheels carried to the machine (e.g. xformers, which installs beside an existing torch)
for whl in wheels/*.whl; do
  [ -e "$whl" ] && pip install -q --no-deps "$whl" >>"$OUT/install.log" 2>&1
done

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU (nvidia-smi not found)"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import timm; print('timm', timm.__version__)" 2>/dev/null || echo "timm: not installed (no 'original' provider)"
  python -m fastmae.ops
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
pack

# the native backend's CUDA library for this GPU, outside the tests (which would build it at collection)
run 90 python -m fastmae.ops.native build --cuda 2>&1 | tail -n 20 | tee "$OUT/native-build.txt"
pack

# every test that runs a kernel, the model or the training step on the GPU (the CPU-only ones are CI's),
# the ops' first and the compiler's last; each test's outcome goes to gpu-tests-full.txt as it ends, so
# that a run stopped at its time limit still says what passed and what failed
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
# (not test_native.py's sm_80 + sm_90 build and its PTX: CI's; the library above is this GPU's; nor the
# compiled step against eager on the CPU, CI's too: test_graphed_step_matches_eager_on_gpu is the GPU's)
run 150 python -m pytest tests/test_ops.py tests/test_kernels.py tests/test_native.py tests/test_parity.py \
  tests/test_step.py tests/test_attention.py tests/test_model.py tests/test_nvjpeg.py tests/test_compile.py \
  --deselect tests/test_native.py::test_cuda_library_compiles_for_a100_and_h100_and_loads \
  --deselect tests/test_native.py::test_cuda_kernels_move_rows_in_16_byte_vectors \
  --deselect tests/test_step.py::test_compiled_step_matches_eager \
  -v -p no:cacheprovider $xdist -rfE --durations=15 >"$OUT/gpu-tests-full.txt" 2>&1
tests_rc=$?
{
  grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error)" "$OUT/gpu-tests-full.txt" | tail -n 60
  [ "$tests_rc" -eq 124 ] && echo "stopped at its time limit after $(grep -cE " (PASSED|FAILED|ERROR|SKIPPED)" \
    "$OUT/gpu-tests-full.txt") outcomes (FAILED/ERROR above; each test's in gpu-tests-full.txt)"
} | tee "$OUT/gpu-tests.txt"
pack

# the MAE kernels at ViT-L/16 batch 256, bf16: both fused backends and the reference, device-timed
bench kernels-vit_l16 90 benchmarks/test_bench_kernels.py -k vit_l16

# the main job, briefly: one epoch of the default pretraining on the GPU (its step compiled and graphed)
run 60 python -m fastmae.pretrain --epochs 1 --output_dir "$OUT/pretrain" 2>&1 | tail -n 25 | tee "$OUT/pretrain.txt"
rm -rf "$OUT/pretrain"
pack

# the pretraining step against the original: ViT-L at the paper's per-GPU batch and at a GPU-filling one
# (batch 64's three rows first: they are kept if batch 256's do not fit in the limit)
export FASTMAE_BENCH_E2E=${E2E:-mae_vit_large_patch16:64,mae_vit_large_patch16:256}
bench e2e 150 benchmarks/test_bench_e2e.py -k training_step

# profile NAME FLAGS...: where the step's time goes (ViT-L, batch 64)
profile() {
  local name=$1; shift
  run 60 python -m fastmae.profile --model mae_vit_large_patch16 --batch_size 64 --norm_pix_loss "$@" \
    --output_dir "$OUT/profile-out" --trace "$OUT/profile-vitl-b64-$name.json" 2>&1 | tail -n 12 \
    | tee "$OUT/profile-vitl-b64-$name.md"
  rm -rf "$OUT/profile-out"
  gzip -f "$OUT/profile-vitl-b64-$name.json" 2>/dev/null
  pack
}
profile graphed  # the default step (its compilation cached by the e2e suite's)

# the host's cost per step (a model of ViT-L's depth with tiny widths): original, reference, graphed
bench host 60 benchmarks/test_bench_e2e.py -k host_cost

profile eager --no-compile  # the step before compilation and graphs, op by op

# one JSON per suite, each under its own time limit, so that a slow suite cannot cost the others
for suite in ${SUITES:-kernels:75 speedup:60 attention:30 data:90}; do
  name=${suite%%:*}
  if [ "$name" = kernels ]; then
    bench "$name" "${suite##*:}" benchmarks/test_bench_kernels.py -k "not vit_l16"  # ViT-L's rows ran above
  else
    bench "$name" "${suite##*:}" "benchmarks/test_bench_$name.py"
  fi
done
python benchmarks/summarize.py "${RESULTS[@]}" --png "$OUT/chart.png" | tee "$OUT/summary.md"
pack
