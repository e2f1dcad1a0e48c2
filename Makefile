# Two entry points for a fresh machine (Python 3.10+, no GPU needed):
#   make demo   install everything into .venv and train the small digits VAE
#   make test   install everything into .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# torch's guess of the toolkit follows the nvcc on PATH; point it at the real one.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda),/usr/local/cuda,)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/*.h csrc/*/*.h csrc/*/*.cuh)

.PHONY: demo test bench clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo,bench]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m vaekern.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --durations=25 tests benchmarks --benchmark-disable

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info vaekern/*.so
