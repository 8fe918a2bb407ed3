#!/usr/bin/env bash
# The one-shot GPU benchmark (benchmarks/gpu.py, docs/performance.md) with its defaults: every job, ≤ 5 minutes.
#
#   bash benchmarks/gpu.sh [JSON_PATH] [gpu.py options...]
#
# The markdown table goes to stdout (and beside the JSON as .md); every measurement to JSON_PATH, else to
# $OUT/gpu-benchmark.json when $OUT is set, else to ./gpu-benchmark.json. Needs no network (gpu_python.sh: spidr
# from src/, soundfile / soxr from the wheels in .whl/ when the image lacks them).
set -euo pipefail
export PYTHONUNBUFFERED=1

json=${1:-}
if [[ -n $json && $json != -* ]]; then
  shift
elif [[ -n ${OUT:-} ]]; then
  json=$OUT/gpu-benchmark.json
else
  json=gpu-benchmark.json
fi
[[ $json == /* ]] || json=$PWD/$json
cd "$(dirname "$0")/.."

# shellcheck source=benchmarks/gpu_python.sh
source benchmarks/gpu_python.sh
# The deadline counts from this script's start (installing wheels, importing torch): 5 minutes in all; a
# --deadline or --smoke given here keeps its own.
deadline=(--deadline $(( SECONDS < 220 ? 280 - SECONDS : 60 )))
for arg in "$@"; do
  if [[ $arg == --deadline* || $arg == --smoke ]]; then deadline=(); fi
done
"$python" benchmarks/gpu.py --json "$json" "${deadline[@]}" "$@" | tee "${json%.json}.md"
echo "gpu.sh: wrote $json and ${json%.json}.md" >&2
