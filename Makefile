# spidr — developer and user entry points. Every target creates/refreshes the virtualenv in .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch from local disk on our machines; elsewhere pip picks a matching wheel.
TORCH_SPEC ?= torch==2.13.0
# System packages for the built-in speech corpus (flite / festival / espeak-ng voices, sox).
APT_PACKAGES := flite sox libsndfile1 festival festlex-cmu festlex-poslex festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts espeak-ng espeak-ng-data libespeak-ng1

.PHONY: venv test test-fast demo demo-long lint bench apt clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[eval,train,slurm,hf,lm,dev]"
	touch $@

venv: $(BIN)/.installed

# Installs the corpus voices when we may (root, apt available); otherwise says which packages are missing.
apt:
	@if command -v flite >/dev/null && command -v espeak-ng >/dev/null && command -v festival >/dev/null \
		&& command -v sox >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "warning: install these Debian packages for the built-in corpus: $(APT_PACKAGES)"; fi

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout 900

test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

demo: venv apt
	$(BIN)/spidr demo --out runs/demo

demo-long: venv apt
# 16 h of training audio (1.9 GB, ~4 min to synthesise): trained 4.5x longer, the demo recipe gains from more
# audio where on the demo's 1 h it loses (docs/demo-recipe.md, "The learning curve of v7").
	$(BIN)/spidr demo --out runs/demo-long --config configs/demo-long.toml --train-hours 16

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
