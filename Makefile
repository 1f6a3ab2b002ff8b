# laueflow: set-up, demo, tests and benchmarks.  `make help` lists the targets.
#
# Everything runs from the virtual environment .venv, created on first use by `make install`
# (python3 -m venv, then pip install -e '.[dev]').  A stamp file makes repeated installs instant;
# editing pyproject.toml triggers a new install.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.laueflow-installed
PIP_FLAGS   ?= --disable-pip-version-check $(if $(CI),--progress-bar off --no-input,)

# demo: a 64 x 64 pixel region of 261 frames (one decoder tile, recon.tile_pixels 4096) on this machine
DEMO_DIR    ?= demo
DEMO_REGION ?= 64
DEMO_PRESET ?= thin

# the suite runs on 2 worker processes (pytest-xdist), each test file on one of them
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --dist loadfile
BENCH_ARGS  ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-gpu bench bench-workflow bench-scale bench-calibrate lint clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv (if missing) and install laueflow with its dev extras

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
		"laueflow needs Python 3.11 or newer; this is " + sys.version.split()[0] + " (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $@

demo: install  ## simulate a small scan, reconstruct it on the local site, print its accuracy
	rm -rf $(DEMO_DIR)
	$(BIN)/laueflow simulate $(DEMO_DIR)/scan --preset $(DEMO_PRESET) --region $(DEMO_REGION)
	$(BIN)/laueflow run $(DEMO_DIR)/scan --out $(DEMO_DIR)/recon --site local
	$(BIN)/laueflow score $(DEMO_DIR)/recon --truth $(DEMO_DIR)/scan/truth.h5

test: install  ## the fast test suite (everything not marked slow)
	$(BIN)/pytest $(PYTEST_ARGS)

test-slow: install  ## the slow, large cases (marked slow)
	@rc=0; $(BIN)/pytest -m slow $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests are marked slow"; rc=0; fi; exit $$rc

test-gpu: install  ## on a GPU node: install JAX's CUDA backend (extra gpu), decode on the GPU against the CPU
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[gpu]'
	$(BIN)/pytest -m gpu -s -p no:cacheprovider tests/test_gpu.py

bench: install  ## decoder benchmark: read / decode / write per stage, against a per-pixel NNLS baseline
	$(BIN)/python benchmarks/bench_decode.py $(BENCH_ARGS)

bench-workflow: install  ## laueflow run, local site, 1 and 2 workers, vs the bare stages; memory per block size
	$(BIN)/python benchmarks/bench_workflow.py $(BENCH_ARGS)

bench-scale: install  ## a production-size point (201 frames of 2048^2, 1200^2 px): reading, stages, laueflow run
	$(BIN)/python benchmarks/bench_scale.py $(BENCH_ARGS)

bench-calibrate: install  ## mask-pose calibration per stage and pose error reached, against a grid search of dist
	$(BIN)/python benchmarks/bench_calibrate.py $(BENCH_ARGS)

lint: install  ## ruff check
	$(BIN)/ruff check .

clean:  ## remove the demo, benchmark cache, Parsl run logs and caches (keeps .venv)
	rm -rf $(DEMO_DIR) .bench-cache runinfo build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove .venv too
	rm -rf $(VENV)
