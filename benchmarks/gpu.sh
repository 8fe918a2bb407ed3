#!/usr/bin/env bash
# The one-shot GPU benchmark (benchmarks/gpu.py, docs/performance.md) with its defaults: every job, ≤ 5 minutes.
#
#   bash benchmarks/gpu.sh [JSON_PATH] [gpu.py options...]
#
# The markdown table goes to stdout (and beside the JSON as .md); every measurement to JSON_PATH, else to
# $OUT/gpu-benchmark.json when $OUT is set, else to ./gpu-benchmark.json. Needs no network: spidr is imported from
# src/, and when soundfile or soxr is missing (a GPU machine's image may lack them) wheels carried in .whl/ are
# installed into a temporary folder first.
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

# $PYTHON, else the project's virtualenv, else python3 (e.g. a GPU image's Python that holds a CUDA PyTorch).
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

if ! "$python" -c 'import soundfile, soxr' 2>/dev/null; then
  if ! compgen -G '.whl/*.whl' >/dev/null; then
    echo "gpu.sh: $python cannot import soundfile/soxr and .whl/ holds no wheels (see docs/performance.md)" >&2
    exit 1
  fi
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:$site
fi

"$python" -c 'import torch; gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")' >&2
"$python" benchmarks/gpu.py --json "$json" "$@" | tee "${json%.json}.md"
echo "gpu.sh: wrote $json and ${json%.json}.md" >&2
