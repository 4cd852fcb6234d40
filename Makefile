# The README's commands. `make demo` and `make test` set everything up first (idempotent:
# a second `make setup` takes seconds).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMPS      := .make
CUDA_HOME   ?= /usr/local/cuda
# nvcc of the toolkit (resolving symlinks such as /usr/local/bin/nvcc), and that toolkit's root
NVCC        := $(shell if [ -x "$(CUDA_HOME)/bin/nvcc" ]; then echo "$(CUDA_HOME)/bin/nvcc"; \
                 elif command -v nvcc >/dev/null 2>&1; then readlink -f "$$(command -v nvcc)"; fi)
CUDA_ROOT   := $(patsubst %/bin/nvcc,%,$(NVCC))
CSRC        := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
# The machine's pip configuration is noisy about local mirrors it cannot read; keep the log useful.
QUIET_PIP   := grep -v -E "^WARNING: Location '.*' is ignored" || true

export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: help setup ext cuda-check test test-fast demo bench env clean gpu-check

help:
	@echo "make setup       create $(VENV) with pinned dependencies and build rgpt4d._C (idempotent)"
	@echo "make test        setup, CUDA compile check (when nvcc exists), then the test suite"
	@echo "make demo        setup, then run the main job (rgpt4d demo)"
	@echo "make bench       setup, then the benchmarks (results in benchmarks/results/<device>/)"
	@echo "make cuda-check  compile every CUDA source (FORCE_CUDA=1) in a scratch build folder"
	@echo "make env         print versions, build flags and available backends"
	@echo "make gpu-check   on a GPU machine: build for it, GPU tests, benchmarks, summary (PY=python3: docs/gpu.md)"
	@echo "make compat-check TORCH=2.11.0 [TRANSFORMERS=4.46.3]  build and test against that torch in a scratch venv"

$(STAMPS):
	@mkdir -p $(STAMPS)

# 1. the virtual environment with the pinned dependencies
$(STAMPS)/deps: requirements.txt | $(STAMPS)
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@echo "[setup] installing pinned dependencies into $(VENV) (torch is large: a few minutes the first time)"
	@$(PIP) install -q --upgrade pip setuptools wheel 2>&1 | $(QUIET_PIP)
	@$(PIP) install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	@touch $@

# 2. the package, editable (the extension is built in place by step 3, so edits to csrc/
#    rebuild incrementally; a plain `pip install --no-build-isolation .` builds it in one go)
$(STAMPS)/install: $(STAMPS)/deps setup.py pyproject.toml | $(STAMPS)
	@echo "[setup] installing rgpt4d (editable)"
	@RGPT4D_NO_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e . 2>&1 | $(QUIET_PIP)
	@touch $@

# 3. build rgpt4d._C in place with ninja (incremental in build/): CPU kernels always; CUDA
#    kernels with FORCE_CUDA=1 or when a GPU and nvcc are present
$(STAMPS)/ext: $(STAMPS)/install $(CSRC) setup.py | $(STAMPS)
	@echo "[setup] building rgpt4d._C"
	@mkdir -p build && $(PY) setup.py build_ext --inplace > build/ext.log 2>&1 || { cat build/ext.log; echo "[setup] building rgpt4d._C failed (log above, also in build/ext.log)"; exit 1; }
	@touch $@

setup: $(STAMPS)/ext
	@$(PY) -c "import rgpt4d, rgpt4d.ops as o; from rgpt4d.ops import registry as b; \
	assert b.extension_loaded(), b.unavailable_reasons(); print('[setup] ok: backends', o.available_backends())"

ext: $(STAMPS)/ext

# Compile-only check of every CUDA source (no GPU needed): the .cu kernels and the *_cuda.cpp
# bindings, linked into a scratch library that is never loaded. Scratch folder, incremental.
cuda-check: $(STAMPS)/install
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found (set CUDA_HOME)"; exit 1; fi
	@echo "[cuda-check] compiling csrc/ with FORCE_CUDA=1 for TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)"
	@mkdir -p build/cuda-check && FORCE_CUDA=1 RGPT4D_CUDA_CHECK=1 CUDA_HOME=$(CUDA_ROOT) $(PY) setup.py build_ext \
		--build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib > build/cuda-check/log 2>&1 \
		|| { grep -E "error|Error" build/cuda-check/log | head -50; echo "[cuda-check] FAILED (full log: build/cuda-check/log)"; exit 1; }
	@test -n "$$(find build/cuda-check/lib -name '_C*.so')" || { echo "cuda-check: no library produced"; exit 1; }
	@# ptxas -v (setup.py adds it for this build): every kernel's spill line; list the ones that spill
	@awk '/Function properties for/ {fn=$$NF} /bytes spill stores/ {n++; split($$0, a, ","); \
		if (a[2] + 0 > 0 || a[3] + 0 > 0) {bad++; print "  SPILL " fn ":" a[2] "," a[3]}} \
		END {printf "[cuda-check] ptxas -v: %d kernel compilations, %d with register spills\n", n, bad + 0}' \
		build/cuda-check/log
	@echo "[cuda-check] ok: $$(find build/cuda-check/lib -name '_C*.so')"

test: setup
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory cuda-check; else echo "[test] nvcc not found: skipping the CUDA compile check"; fi
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -x tests

demo: setup
	$(VENV)/bin/rgpt4d demo

# Every op family and the end-to-end student step; CSV, markdown and PNGs in
# benchmarks/results/<device>/, then the summary. BENCH_ARGS (e.g. --quick, --no-compile) goes to each.
bench: setup
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

env: setup
	@$(VENV)/bin/rgpt4d env

clean:
	rm -rf build $(STAMPS) rgpt4d/_C*.so *.egg-info

# ---- make gpu-check (docs/gpu.md) ------------------------------------------------------------
# On a GPU machine, in about 8 minutes: build rgpt4d._C in place for this GPU, run the GPU tests,
# time every op family at the paper shapes, write benchmarks/results/<gpu-name>/ and a summary.
# Runs with $(PY) as is (no setup: `make gpu-check PY=python3` uses a system Python with torch);
# stops at once without a GPU. GPU_CHECK_ARGS, e.g. --budget 600 or --skip-build, go to the script.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# ---- make compat-check TORCH=2.11.0 [TRANSFORMERS=4.46.3] [TESTS="tests/ops tests/test_minimal_install.py"]
# Builds and tests rgpt4d against another torch (and optionally another transformers) in a scratch
# venv, build/compat-torch<TORCH>/ (not part of `make test`: it downloads torch). The package is
# installed from its source distribution (python -m build --sdist, then pip install
# --no-build-isolation of the tarball: rgpt4d._C compiles against that torch; skipped when the
# sdist's contents equal the installed one's), and the tests run from a copy of tests/ (plus
# kernels/ and examples/, which some tests read) so that they import the installed package, not
# this checkout. The other dependencies are requirements.txt's pins, except torch-bound packages
# (torchvision: the release matching TORCH; xformers: left out, its tests skip) and, with
# TRANSFORMERS, transformers/tokenizers (pip picks what that version needs; a later run without
# TRANSFORMERS puts the pins back).
COMPAT_DIR  = build/compat-torch$(TORCH)
COMMA      := ,
COMPAT_PY   = $(COMPAT_DIR)/venv/bin/python
TESTS      ?= tests

.PHONY: compat-check
compat-check:
	@test -n "$(TORCH)" || { echo 'usage: make compat-check TORCH=2.11.0 [TRANSFORMERS=4.46.3] [TESTS="tests/ops"]'; exit 2; }
	@mkdir -p $(COMPAT_DIR)
	@test -x $(COMPAT_PY) || $(PYTHON_BOOT) -m venv $(COMPAT_DIR)/venv
	@echo "[compat] $(COMPAT_DIR): installing torch==$(TORCH)$(if $(TRANSFORMERS), transformers==$(TRANSFORMERS)) and the pinned dependencies"
	@grep -v -E '^(torch|torchvision|xformers)==$(if $(TRANSFORMERS),|^(transformers|tokenizers)==)' requirements.txt > $(COMPAT_DIR)/requirements.txt
	@$(COMPAT_PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	@$(COMPAT_PY) -m pip install -q "torch==$(TORCH)" torchvision setuptools wheel $(if $(TRANSFORMERS),"transformers==$(TRANSFORMERS)") \
		-r $(COMPAT_DIR)/requirements.txt 2>&1 | $(QUIET_PIP)
	@$(COMPAT_PY) -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)', torch.__version__"
	@$(if $(TRANSFORMERS),$(COMPAT_PY) -c "import transformers as t; assert t.__version__ == '$(TRANSFORMERS)'$(COMMA) t.__version__")
	@rm -rf $(COMPAT_DIR)/dist $(COMPAT_DIR)/run
	@$(COMPAT_PY) -m build --sdist --no-isolation --outdir $(COMPAT_DIR)/dist . > $(COMPAT_DIR)/sdist.log 2>&1 \
		|| { tail -30 $(COMPAT_DIR)/sdist.log; exit 1; }
	@sum=$$(tar -xOzf $(COMPAT_DIR)/dist/rgpt4d-*.tar.gz | sha256sum | cut -d' ' -f1); \
	if [ "$$sum" = "$$(cat $(COMPAT_DIR)/installed.sha256 2>/dev/null)" ]; then echo "[compat] rgpt4d: the installed build is of the same sources"; \
	else echo "[compat] installing the sdist (compiles rgpt4d._C: log in $(COMPAT_DIR)/install.log)"; \
	  $(COMPAT_PY) -m pip install -v --no-build-isolation --no-deps --force-reinstall $(COMPAT_DIR)/dist/rgpt4d-*.tar.gz \
	    > $(COMPAT_DIR)/install.log 2>&1 || { grep -E "error|Error" $(COMPAT_DIR)/install.log | head -40; exit 1; }; \
	  echo "$$sum" > $(COMPAT_DIR)/installed.sha256; fi
	@mkdir -p $(COMPAT_DIR)/run && cp -r tests kernels examples pyproject.toml $(COMPAT_DIR)/run/
	@cd $(COMPAT_DIR)/run && ../venv/bin/python -c "import rgpt4d, rgpt4d.ops as o, torch, importlib.metadata as m; \
	from rgpt4d.ops import registry as b; assert 'site-packages' in rgpt4d.__file__, rgpt4d.__file__; \
	assert b.extension_loaded(), b.unavailable_reasons(); \
	tf = [d.version for d in m.distributions() if d.metadata['Name'] == 'transformers']; \
	print('[compat] torch', torch.__version__, '| transformers', tf[0] if tf else '-', '| backends', o.available_backends())"
	@echo "[compat] running $(TESTS) (log in $(COMPAT_DIR)/pytest.log)"
	@cd $(COMPAT_DIR)/run && ../venv/bin/python -m pytest -q -p no:cacheprovider $(TESTS) 2>&1 | tee ../pytest.log | tail -40
