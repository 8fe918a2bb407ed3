# Sourced by the one-shot GPU scripts (gpu.sh, learning_curve_gpu.sh) from the repository root: sets $python and
# PYTHONPATH so that spidr is imported from src/ with no network. $PYTHON, else the project's virtualenv, else
# python3 (e.g. a GPU image's Python that holds a CUDA PyTorch); when soundfile or soxr is missing (a GPU machine's
# image may lack them) the wheels carried in .whl/ are installed into a temporary folder first.
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

# What spidr imports beyond torch (scipy: the log-mel front end and MFCCs); the GPU image has numpy and scipy.
# Imported, not only found: soundfile is found without cffi, and then fails to import; one installed without its
# C library raises an OSError, which counts as missing too (the carried wheels then come first on the path).
missing_modules() {
  "$python" -c 'import importlib
def missing(name):
    try:
        importlib.import_module(name)
    except Exception:
        return True
    return False
print(" ".join(m for m in ("numpy", "scipy", "soundfile", "soxr") if missing(m)))'
}
missing=$(missing_modules)
if [[ -n $missing ]]; then
  if ! compgen -G '.whl/*.whl' >/dev/null; then
    echo "$0: $python cannot import $missing and .whl/ holds no wheels (see docs/performance.md)" >&2
    exit 1
  fi
  site=$(mktemp -d)
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  else  # an image Python without pip: a wheel is a zip whose root goes on the path as it is
    for wheel in .whl/*.whl; do "$python" -m zipfile -e "$wheel" "$site"; done
  fi
  export PYTHONPATH=$PYTHONPATH:$site
  missing=$(missing_modules)
  if [[ -n $missing ]]; then
    echo "$0: still missing after installing .whl/: $missing (carry their wheels too)" >&2
    exit 1
  fi
fi

"$python" -c 'import torch; gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")' >&2
