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
for arg in "$@"; do  # the help alone: no table, no file written
  if [[ $arg == -h || $arg == --help ]]; then exec "$python" benchmarks/gpu.py --help; fi
done
# The deadline counts from this script's start: 5 minutes in all by default, or the --deadline given here (the
# wall-clock limit the script runs under, less a minute for the jobs' exits). The time spent installing wheels and
# importing torch, and 15 s for gpu.py's own start, come off it; --smoke without --deadline keeps gpu.py's own.
total=280
given=
smoke=
args=()
while (( $# )); do
  case $1 in
    --deadline)
      if (( $# < 2 )); then echo "$0: --deadline needs a number of seconds" >&2; exit 2; fi
      given=$2; shift 2 ;;
    --deadline=*) given=${1#--deadline=}; [[ -n $given ]] || given=none; shift ;;
    --smoke) smoke=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -n $given ]]; then
  if [[ ! $given =~ ^[0-9]+(\.[0-9]*)?$ ]]; then
    echo "$0: --deadline $given: expected a number of seconds" >&2; exit 2
  fi
  given=$(( 10#${given%.*} ))  # whole seconds, read in base 10 ("08" is not octal)
fi
deadline=()
if [[ -n $given || -z $smoke ]]; then  # --smoke alone keeps gpu.py's own deadline
  left=$(( ${given:-$total} - SECONDS - 15 ))
  if (( left < 60 )); then  # the jobs need a minute at least: say that the limit given is overrun
    echo "$0: ${given:-$total} s leave $left s for the jobs; giving them 60 s (the script ends after its limit)" >&2
    left=60
  fi
  deadline=(--deadline "$left")
fi
"$python" benchmarks/gpu.py --json "$json" "${deadline[@]}" "${args[@]}" | tee "${json%.json}.md"
echo "gpu.sh: wrote $json and ${json%.json}.md" >&2
