# whaletron: `make demo` and `make test` set up .venv on a fresh machine (Python 3.11, no GPU).
#
# torch==2.13.0 is installed FIRST, on its own: any unpinned torch requirement resolved
# before it (megatron-core's, for one) would download gigabytes of CUDA wheels.

# Fallback interpreter; python3.11 is preferred unless PY is set on the command line or in
# the environment (e.g. `make test PY=/opt/python3.11/bin/python3`).
PY ?= python3
ifeq ($(filter command line environment,$(origin PY)),)
VENV_PY := $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo $(PY))
else
VENV_PY := $(PY)
endif

VENV := .venv
TORCH := torch==2.13.0
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test clean

venv: $(VENV)/.installed

# The stamp is rebuilt only when pyproject.toml changes, so a second run installs nothing.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(VENV_PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install "$(TORCH)"
	$(VENV)/bin/python -m pip install -e ".[test]"
	touch $@

# The main job: the tiny V3 preset on the embedded corpus, 4 CPU ranks (pp2 x ep2, DualPipeV).
DEMO_ARGS ?=
demo: venv
	PY=$(VENV)/bin/python launch/torchrun.sh 4 --config configs/pretrain/tiny_v3.yaml $(DEMO_ARGS)
	$(VENV)/bin/python -m posttrain.generate --checkpoint runs/tiny_v3 --prompt "def " --prompt "import " \
		--num-samples 2 --max-new-tokens 48

# Two pytest workers (pytest-xdist), one intra-op thread each: the tiny models are latency-bound, so
# two tests side by side beat one test with two threads on CI's 2 cores.
PYTEST_WORKERS ?= 2
# ruff first (the project's [tool.ruff] settings: pyflakes errors and 120-column lines), so a lint
# failure stops the target before the slower pytest run.
test: venv
	$(VENV)/bin/python -m ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV)
