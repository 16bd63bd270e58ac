# `make demo`: set up, build, train, export, infer, benchmark, report.   `make test`: set up, build, test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
DATASET_DIR := /usr/share/datasets/fashion-mnist
# The toolkit that matches the pinned torch (cpp_extension's own guess misses it).
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export MAX_JOBS ?= 2

.PHONY: setup build test demo dataset cpp bench-op clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian (needs root); without it the real-data tests skip and training asks for --data-dir.
dataset:
	@if [ -d $(DATASET_DIR) ]; then echo "Fashion-MNIST found in $(DATASET_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not installed: run 'apt-get install dataset-fashion-mnist' as root, or pass --data-dir"; fi

# Rebuilt only when a source of the extension changes (a CUDA build takes minutes).
EXTENSION_SOURCES := setup.py pyproject.toml $(shell find csrc -path csrc/runner -prune -o -type f -print)
$(VENV)/.built: $(VENV)/.installed $(EXTENSION_SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import resnet_deploy._library as l; print(l.build_info())"
	touch $@

build: $(VENV)/.built

test: build dataset
	$(PY) -m pytest -q

# The whole pipeline on the real Fashion-MNIST into $(RUN_DIR): train, export, infer, bench, REPORT.md.
demo: build dataset
	$(PY) -m resnet_deploy.cli demo --out $(RUN_DIR)

# The Python-free operator library and the C++ runner, built with CMake against the pip torch's libtorch.
# CUDA kernels are added when nvcc matches torch's CUDA; CMAKE_ARGS=-DRESNET_DEPLOY_CUDA=OFF skips them.
cpp: setup
	cmake -S . -B build/cpp -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $(CMAKE_ARGS)
	cmake --build build/cpp -j$(MAX_JOBS)
	@echo "C++ runner: build/cpp/resnet_deploy_infer (operator library: build/cpp/libresnet_deploy_ops.so)"

bench-op: build
	$(PY) scripts/bench_op.py

clean:
	rm -rf build *.egg-info resnet_deploy/*.so $(VENV)/.built
