# Development environment and checks. `make env` builds .venv/ (about 20 minutes
# on a fresh 2-core machine, most of it compiling mmcv's ops; seconds afterwards,
# pip caches the built wheel). `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PIN := -c requirements/constraints.txt
SETUPTOOLS := "setuptools>=77,<81"

.PHONY: env test

env: $(VENV)/.installed

$(VENV)/.installed: requirements/constraints.txt setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(SETUPTOOLS) wheel
	$(PIP) install $(PIN) torch torchvision
	$(PIP) install $(PIN) mmengine ninja psutil
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install $(PIN) --no-build-isolation mmcv
	$(PIP) install $(PIN) mmsegmentation ftfy regex mmpretrain openmim pytest scikit-learn matplotlib onnx onnxscript onnxruntime
	# the checks make test runs before the tests (config in pyproject.toml)
	$(PIP) install $(PIN) ruff import-linter
	# openmim's dependencies pull setuptools back to 60.x; mim needs pkg_resources
	$(PIP) install $(SETUPTOOLS)
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import torchvision, mmcv.ops, mmseg, mmpretrain, mmgradfilt"
	# compile the CPU kernels now (cached), not in the first test
	$(PY) -c "from mmgradfilt.ops import cpu_kernels; assert cpu_kernels.loaded()"
	$(VENV)/bin/mim train --help > /dev/null
	touch $@

# lint (ruff) and the layers of docs/design.md (import-linter), then the tests
test: env
	$(VENV)/bin/ruff check mmgradfilt tools tests
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest tests

# The offline segmentation demo: digits data, calib from scratch, then enc5L
# vs filt5L fine-tuning on a shifted domain, and their table (a few minutes on
# 2 CPU cores; one thread per process, faster on a shared 2-core machine)
.PHONY: demo
demo: env
	OMP_NUM_THREADS=1 $(PY) tools/seg_demo.py
