# The README's commands. Each target sets itself up: a .venv with a CPU torch (TORCH_SPEC), the
# test and benchmark dependencies, and the compiled extension built in place.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_VENV ?= .venv-cuda
BENCH_ARGS ?=
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fastattn-deps
DEPS := setuptools wheel ninja pybind11 numpy pytest hypothesis tqdm matplotlib triton \
        "transformers==4.57.*" performer-pytorch "local-attention==1.9.0" linformer

.PHONY: build test bench gpu-check cuda-build-check cuda-compile-each gpu-static-check

$(DEPS_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(DEPS_STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: build
	$(PY) -m bench $(BENCH_ARGS)

# For a machine with an NVIDIA GPU, torch and triton already installed and no network (DESIGN section 6).
gpu-check:
	bash scripts/gpu_check.sh

# Compiles and links the CUDA kernels against a CUDA build of torch; needs nvcc, not a GPU.
cuda-build-check:
	bash scripts/cuda_build_check.sh

# Compiles each csrc/cuda/*.cu alone with plain nvcc -c (no torch on the include path); needs nvcc, not a GPU.
cuda-compile-each:
	bash scripts/cuda_compile_each.sh

# Compiles every Triton variant (Triton 3.6, in .venv-triton36) and every .cu for sm_80 and sm_90 and checks
# shared memory, registers, spills and pipelining (scripts/gpu_static_check.py); needs nvcc, not a GPU.
gpu-static-check:
	bash scripts/gpu_static_check.sh $(GPU_STATIC_CHECK_ARGS)
