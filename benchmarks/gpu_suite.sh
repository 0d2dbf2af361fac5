#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes on a fresh H100/H200: the tests
# that matter on a GPU, then every benchmark, then the report. Results JSON and the log go to
# $OUT (the device tool's output folder) or, when run by hand, to benchmarks/results/. Commit the
# JSON files it writes; never edit their numbers.
#
#   POWERLAW_FAST_COMMIT=<sha> MNIST=.data/mnist bash benchmarks/gpu_suite.sh   # on the GPU
#   bash benchmarks/gpu_suite.sh --dry-run       # CPU-only rehearsal: every part end to end
#
# The device machine's copy of the checkout is not a git repository: pass the commit as
# POWERLAW_FAST_COMMIT (run `git rev-parse HEAD` here and paste it); outside git and without it
# the commit is recorded as "unknown". It goes into environment.txt and every results JSON.
# The device machine has torch, triton, cupy and pytest but no network: the package is used in
# place through PYTHONPATH instead of being installed. Python is ${PYTHON:-python3}.
#
# Files under $OUT (the device tool returns at most 8 files, 2 folders deep):
#   environment.txt  suite.log (every part's output, one after another)  summary.txt
#   report.txt  <device>/penalty.json  <device>/training.json  <device>/attacks.json
#   <device>/basis.json
# Every benchmark rewrites its JSON after each row ("complete": false until its end), so a part
# stopped by its budget keeps what it measured.
#
# --dry-run (no GPU needed): TRITON_INTERPRET=1, tiny sizes and few repeats, the GPU test
# selection collected and its GPU-only tests run where a GPU is present (skipped on a CPU), no
# nvidia-smi; OUT defaults to benchmarks/results/dry-run (git-ignored). About 2 minutes on 2
# cores; tests/test_gpu_suite.py runs it in CI.
#
# Budgets (seconds; GPU run, 480 s in all with the report; bench_basis: step times at N = 500,
# 2000 and 8192, the last with one eigh of seconds per exact-mode step, then the quality pass): they follow from what each part
# compiles. bench_penalty: 5 widths x 3 settings = 15 autotune keys, each 4 configs x 2 GEMM
# kernels, plus 6 torch.compile calls (N <= 2048) - widths run 1024, 4096, 2048, 8192, 16384 so
# the targets come first. bench_training: the MLP, then the CNN, then the wide MLP (most
# compiles) last. The JSON's "triton_compiles" counts the autotune keys and binaries each part
# needed, to size these budgets from the next run.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) echo "gpu_suite.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
if [ "$DRY_RUN" -eq 1 ]; then
  OUT=${OUT:-benchmarks/results/dry-run}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # behave as a CPU-only machine
  BUDGET_TESTS=${BUDGET_TESTS:-240} BUDGET_PENALTY=${BUDGET_PENALTY:-180}
  BUDGET_TRAINING=${BUDGET_TRAINING:-180} BUDGET_ATTACKS=${BUDGET_ATTACKS:-180}
  BUDGET_BASIS=${BUDGET_BASIS:-120}
  BENCH_FLAG=(--dry-run)
else
  OUT=${OUT:-benchmarks/results}
  BUDGET_TESTS=${BUDGET_TESTS:-110} BUDGET_PENALTY=${BUDGET_PENALTY:-140}
  BUDGET_TRAINING=${BUDGET_TRAINING:-90} BUDGET_ATTACKS=${BUDGET_ATTACKS:-70}
  BUDGET_BASIS=${BUDGET_BASIS:-50}
  BENCH_FLAG=()
fi
BUDGET_REPORT=${BUDGET_REPORT:-20}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export POWERLAW_FAST_DATA=${MNIST:-${POWERLAW_FAST_DATA:-}}
if [ -z "${POWERLAW_FAST_COMMIT:-}" ]; then
  POWERLAW_FAST_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ "$POWERLAW_FAST_COMMIT" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    POWERLAW_FAST_COMMIT="$POWERLAW_FAST_COMMIT+modified"
  fi
fi
export POWERLAW_FAST_COMMIT
SUITE_START=$SECONDS
status=0
LOG="$OUT/suite.log"
: > "$LOG"
: > "$OUT/summary.txt"
{
  echo "commit: $POWERLAW_FAST_COMMIT"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $([ "$DRY_RUN" -eq 1 ] && echo 'dry run (CPU, Triton interpreter)' || echo 'GPU')"
  echo "host: $(uname -srm), $(nproc 2>/dev/null || echo '?') CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 \
      || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not importable"
  "$PY" -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "cupy: not importable"
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

# run_part NAME BUDGET COMMAND...: its output into suite.log (and the terminal), its exit code
# and time into summary.txt; a part that runs out of budget is reported, not hidden.
run_part() {
  local name=$1 budget=$2
  shift 2
  local start=$SECONDS
  echo "==== $name (budget ${budget} s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note=" (stopped at its ${budget} s budget)"
  fi
  [ "$rc" -ne 0 ] && status=1
  printf '%-15s exit %3d after %4d s of %4d s%s\n' "$name" "$rc" "$((SECONDS - start))" \
    "$budget" "$note" >> "$OUT/summary.txt"
  echo "==== $name: exit $rc after $((SECONDS - start)) s$note" | tee -a "$LOG"
}

# The tests that matter on a GPU: the ops (compiled Triton kernels), the CUDA C++ backend, the
# attacks on CUDA tensors (CUDA graphs included) and the regulariser (grouped Triton path,
# torch.compile, the tracked basis's sweeps on CUDA tensors, the README's whole-step CUDA-graph capture). Left out: the CPU compile checks for sm_90 (ptxas on the host, minutes), the
# gloo process-group tests (CPU processes, a minute), the hypothesis property tests (every
# drawn width is a new autotune key: minutes of compiling; CI runs them on the CPU) and
# this script's own dry-run test. A dry run runs only the GPU-marked tests of the same selection
# (all skipped on a CPU, so it checks that everything collects and imports).
TESTS=(tests/ops tests/cuda tests/attacks tests/training/test_regularizer.py
       "tests/training/test_tracked_basis.py::test_sweeps_on_a_gpu_match_the_cpu_without_a_synchronisation_and_capture_in_a_graph"
       "tests/test_readme.py::test_the_whole_step_capture_snippet_trains_on_a_gpu"
       --ignore=tests/ops/test_triton_sm90_compile.py
       --ignore=tests/ops/test_triton_sm90_configs.py
       --ignore=tests/ops/test_distributed_ops.py
       --ignore=tests/ops/test_properties.py)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --durations=15 -o addopts="")
if [ "$DRY_RUN" -eq 1 ]; then
  run_part gpu_tests "$BUDGET_TESTS" "${PYTEST[@]}" "${TESTS[@]}" -m gpu -rs
else
  run_part gpu_tests "$BUDGET_TESTS" "${PYTEST[@]}" "${TESTS[@]}" -rfEs --maxfail=25
fi
run_part bench_penalty "$BUDGET_PENALTY" "$PY" benchmarks/bench_penalty.py --out "$OUT" "${BENCH_FLAG[@]}"
run_part bench_training "$BUDGET_TRAINING" "$PY" benchmarks/bench_training.py --out "$OUT" "${BENCH_FLAG[@]}"
run_part bench_attacks "$BUDGET_ATTACKS" "$PY" benchmarks/bench_attacks.py --out "$OUT" "${BENCH_FLAG[@]}"
run_part bench_basis "$BUDGET_BASIS" "$PY" benchmarks/bench_basis.py --out "$OUT" "${BENCH_FLAG[@]}"
# the targets of each issue, met or not, from what this run wrote
run_part report "$BUDGET_REPORT" "$PY" benchmarks/report.py --results "$OUT" --no-plot
awk '/^==== report \(budget/{on=1; next} /^==== report:/{on=0} on' "$LOG" > "$OUT/report.txt"

{
  echo "---- summary ($([ "$DRY_RUN" -eq 1 ] && echo dry run || echo GPU run), commit $POWERLAW_FAST_COMMIT) ----"
  cat "$OUT/summary.txt"
  echo "total: $((SECONDS - SUITE_START)) s"
  echo "tests: $(grep -E '^[0-9]+ (passed|failed|skipped|deselected|error)|^=+ .*(passed|failed|skipped|error).* =+$|no tests ran' "$LOG" | tail -n 1)"
  echo "results files:"
  for name in penalty training attacks basis; do
    found=$(find "$OUT" -mindepth 2 -maxdepth 2 -name "$name.json" | head -n 1)
    if [ -n "$found" ]; then
      complete=$(grep -o '"complete": [a-z]*' "$found" | head -n 1)
      rows=$(grep -c '"median_ms"' "$found")
      echo "  $found ($rows timed rows, ${complete:-no complete flag})"
    else
      echo "  $name.json: missing"
      status=1
    fi
  done
  echo "status: $([ "$status" -eq 0 ] && echo ok || echo FAILED)"
} > "$OUT/summary.tmp"
mv "$OUT/summary.tmp" "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
