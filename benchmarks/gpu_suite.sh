#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the test suite with the GPU tests on, then every
# benchmark. Results JSON and logs go to $OUT (the device tool's output folder) or, when run by
# hand, to benchmarks/results/. Commit the JSON files it writes; never edit their numbers.
#
#   MNIST=.data/mnist bash benchmarks/gpu_suite.sh            # .data/ is git-ignored
#
# The device machine has torch, triton, cupy and pytest but no network: the package is used in
# place through PYTHONPATH instead of being installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export POWERLAW_FAST_DATA=${MNIST:-${POWERLAW_FAST_DATA:-}}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
# Each part has a wall-clock budget so that the whole script ends within 8 minutes on a fresh
# H100/H200 (compilation and autotuning included); a part that runs out is reported, not hidden.
run_part() {  # name budget_seconds command...
  local name=$1 budget=$2
  shift 2
  local start=$SECONDS
  timeout "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "$name: stopped at its ${budget} s budget" | tee -a "$OUT/summary.txt"
  [ "$rc" -ne 0 ] && status=1
  echo "$name: exit $rc after $((SECONDS - start)) s" >> "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
run_part gpu_tests 170 python -m pytest tests -q -p no:cacheprovider -m "gpu or not gpu"
run_part bench_penalty 130 python benchmarks/bench_penalty.py --out "$OUT"
run_part bench_training 70 python benchmarks/bench_training.py --out "$OUT"
run_part bench_attacks 70 python benchmarks/bench_attacks.py --out "$OUT"
# the targets of each issue, met or not, from what this run wrote
python benchmarks/report.py --results "$OUT" --no-plot 2>&1 | tee "$OUT/report.txt" || status=1
echo "---- summary ----"
cat "$OUT/summary.txt"
tail -n 3 "$OUT/gpu_tests.log"
exit $status
