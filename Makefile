# softprune: every target sets up .venv on a fresh machine when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: help venv data test test-fast demo zoo zoo-timm bench lint format clean

help:
	@echo "make test   - set up .venv if needed, install Fashion-MNIST where apt-get can, run the test suite"
	@echo "make demo   - train a small ResNet on Fashion-MNIST with GHFP at 40%, compact it, compare"
	@echo "make zoo    - prune and compact every torchvision classification model (long)"
	@echo "make zoo-timm - the same for the smallest model of every timm CNN/hybrid family (long)"
	@echo "make bench  - run the benchmarks under benchmarks/ (results in benchmarks/results/; ~1 h)"
	@echo "make lint   - ruff"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian ships Fashion-MNIST as a package; install it where apt-get is available (root or sudo).
data:
	@if [ -d $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "warning: could not install dataset-fashion-mnist; tests that need it will say so"; \
	else echo "warning: no apt-get; put Fashion-MNIST IDX files in $(FMNIST) or pass a data path"; fi

test: venv data
	$(PY) -m pytest -n 2 -q

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

demo: venv data
	$(VENV)/bin/softprune demo

zoo: venv
	cd benchmarks && ../$(PY) zoo.py --out ../docs/zoo.md --json results/zoo.json

zoo-timm: venv
	cd benchmarks && ../$(PY) zoo_timm.py --torch-pruning --out ../docs/zoo_timm.md --json results/zoo_timm.json

bench: venv data
	cd benchmarks && ../$(PY) overhead.py
	cd benchmarks && ../$(PY) speedup.py
	cd benchmarks && ../$(PY) vs_torch_pruning.py
	cd benchmarks && ../$(PY) methods.py

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: venv
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
