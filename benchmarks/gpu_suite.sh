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
python -m pytest tests -q -p no:cacheprovider -m "gpu or not gpu" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
for bench in bench_penalty bench_training bench_attacks; do
  python "benchmarks/$bench.py" --out "$OUT" 2>&1 | tee "$OUT/$bench.log" || status=1
done
# the targets of each issue, met or not, from what this run wrote
python benchmarks/report.py --results "$OUT" --no-plot 2>&1 | tee "$OUT/report.txt" || status=1
exit $status
