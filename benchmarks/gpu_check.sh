#!/usr/bin/env bash
# GPU check, on a CUDA machine with no network, in at most 5 minutes (SGSD_GPU_CHECK_SECONDS,
# default 290: every stage's limit is cut to what is left of it, so the total holds even when a
# stage hangs; the per-stage limits below are a split by reasoning, not yet timed on a GPU):
#   1. install the package from this checkout without network (builds the C++/CUDA extension);
#   2. run the CUDA tests (pytest -m cuda: the Triton kernel tests on CUDA tensors, values and
#      gradients against float64, plus the other CUDA-only tests);
#   3. `sgsd-fast bench --preset gpu`: linear_logprobs fwd+bwd (ours, naive, cut-cross-entropy when
#      importable), teacher log-probs and the SGSD loss at K=8, linear_divergence JSD at K=1 (+ liger)
#      and K=4, at N=16384, H=2048, V=151936 in bf16: ms, peak MiB, % of the bf16 GEMM floor;
#   4. `sgsd-fast bench --preset gpu-e2e`: a Qwen3-1.7B-shaped SGSD step, ours vs naive, and the
#      longest rollout that fits 24 GiB;
#   5. the tile sweep: every tile configuration configs.TABLE lists for this architecture, timed on
#      the log-prob kernels at N=8192, H=2048, V=151936 (benchmarks/tile_sweep.py);
#   6. the `sgsd-fast plan` estimate of that step next to its measured peak and longest rollout
#      (benchmarks/plan_vs_gpu_e2e.py).
# Everything lands in $OUT (default: gpu-check-out/): gpu_check.md (all tables), gpu.json,
# gpu-e2e.json, gpu.png and gpu_check.log. Each stage has its own time limit and a failed stage
# does not stop the later ones; the exit status is non-zero if any stage failed.
#
# SGSD_BENCH_DRYRUN=1 runs the same code paths on a CPU at tiny shapes (no install, tests only
# collected), to check this script without a GPU.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
PY="${PYTHON:-python3}"
DRYRUN="${SGSD_BENCH_DRYRUN:-0}"
mkdir -p "$OUT"
rm -f "$OUT"/gpu.json "$OUT"/gpu.md "$OUT"/gpu.png "$OUT"/gpu-e2e.json "$OUT"/gpu-e2e.md "$OUT"/plan-gpu-e2e.md "$OUT"/tile-sweep.md  # no stale results
LOG="$OUT/gpu_check.log"
: > "$LOG"
failed=()
export PYTHONUNBUFFERED=1

TOTAL="${SGSD_GPU_CHECK_SECONDS:-290}"
stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit (capped by what is left of TOTAL), log it, remember failures
    local name="$1" limit="$2"
    shift 2
    local left=$((TOTAL - SECONDS))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -le 0 ]; then
        echo "== $name: exit skipped (the ${TOTAL}s total is spent)" | tee -a "$LOG"
        failed+=("$name (no time left)")
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

cuda_tests() {  # every test marked cuda: the Triton kernel tests run there on CUDA tensors (conftest)
    "$PY" -m pytest -q -p no:cacheprovider "$@" -m cuda tests
    local rc=$?
    [ "$rc" -eq 5 ] && rc=1  # nothing selected: the device-parametrized tests went missing
    return "$rc"
}
export -f cuda_tests  # `timeout` runs programs, not functions: stages call it through bash -c
export PY

if [ "$DRYRUN" = "1" ]; then
    echo "SGSD_BENCH_DRYRUN=1: no install, tests collected only, GPU presets at tiny CPU shapes" | tee -a "$LOG"
    stage "cuda tests (collect only)" 80 bash -c 'cuda_tests "$@"' _ --collect-only
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
    stage "install (no network)" 45 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
    # Triton JIT-compiles every kernel variant (dtype, kind, flags) on first use: most of this stage
    stage "cuda tests" 80 bash -c 'cuda_tests "$@"' _ -x
fi

for preset_limit in gpu:50 gpu-e2e:75; do
    preset="${preset_limit%%:*}"
    stage "bench $preset" "${preset_limit##*:}" "$PY" -m sgsd_fast.commands bench --preset "$preset" --out "$OUT"
    # A preset stopped by its limit leaves a checkpointed JSON of the cases it finished: tabulate those.
    if [ ! -f "$OUT/$preset.md" ] && [ -f "$OUT/$preset.json" ]; then
        "$PY" -m sgsd_fast.commands bench --render "$OUT/$preset.json" --out "$OUT" >> "$LOG" 2>&1
    fi
done

# Each tile configuration listed for this architecture, timed (which one configs.py should launch).
stage "tile sweep" 25 bash -c '"$PY" -m benchmarks.tile_sweep > "$1/tile-sweep.md"' _ "$OUT"

# The plan of the gpu-e2e configuration next to its measured peak and longest rollout (no GPU needed).
stage "plan vs gpu-e2e" 15 bash -c '"$PY" -m benchmarks.plan_vs_gpu_e2e "$1" > "$1/plan-gpu-e2e.md"' _ "$OUT"

{
    echo "# GPU check"
    echo
    [ "$DRYRUN" = "1" ] && echo "**Dry run (SGSD_BENCH_DRYRUN=1): tiny CPU shapes, not GPU numbers.**" && echo
    for md in "$OUT/gpu.md" "$OUT/gpu-e2e.md" "$OUT/tile-sweep.md" "$OUT/plan-gpu-e2e.md"; do
        [ -f "$md" ] && cat "$md" && echo
    done
    echo "## Stages"
    grep '^== .*: exit' "$LOG"
} > "$OUT/gpu_check.md"
rm -f "$OUT/gpu.md" "$OUT/gpu-e2e.md" "$OUT/tile-sweep.md" "$OUT/plan-gpu-e2e.md"  # folded into gpu_check.md: fewer files to carry back

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" | tee -a "$OUT/gpu_check.md"
    exit 1
fi
echo "all stages passed; results in $OUT/gpu_check.md"
