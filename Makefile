# Quick start:  make demo  (set up, then explain MNIST digits)   |   make test  (set up, then run the tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is large: install it once into the venv; this pair is the one the project is tested with
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup lxt-overlay browser lint test test-gpu demo bench coverage clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# tests/lxt_agreement compares lrp with LXT 2.1, which patches transformers 4.51.3 while the venv has transformers
# 5: LXT and its transformers get a small overlay of their own (no torch: the venv's serves), which only LXT's
# reference run puts on its PYTHONPATH. Pinned in tests/lxt_agreement/requirements.txt; when it cannot be
# installed, those tests skip.
LXT_OVERLAY := $(VENV)/lxt-overlay

$(LXT_OVERLAY)/.installed: tests/lxt_agreement/requirements.txt | $(VENV)/.installed
	rm -rf $(LXT_OVERLAY)
	$(PY) -m pip install -q --no-deps --target $(LXT_OVERLAY) -r tests/lxt_agreement/requirements.txt && touch $@ \
		|| { rm -rf $(LXT_OVERLAY); echo "LXT overlay not installed: tests/lxt_agreement (agreement with LXT) will be skipped"; }

lxt-overlay: $(LXT_OVERLAY)/.installed

# the browser tests (tests/test_serve_browser.py) drive Debian's Chromium; install it when missing (root only)
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Chromium (Debian) for the browser tests"; \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
			|| echo "Chromium could not be installed: the browser tests will be skipped"; \
	else \
		echo "no /usr/bin/chromium (installing it needs root and apt-get): the browser tests will be skipped"; \
	fi

# ruff and mypy on the package, then the test suite
lint: setup
	$(PY) -m ruff check src/lrp
	$(PY) -m mypy

# in parallel, one worker per core (pytest-xdist), each test file on one worker (its module fixtures built once);
# tests/conftest.py gives each worker one torch thread
test: setup lxt-overlay browser lint
	LRP_LXT_OVERLAY=$(abspath $(LXT_OVERLAY)) $(PY) -m pytest -n auto --dist loadfile

# the device lane (tests/device_lane.py): the tests that run models (those taking the `device` fixture, marked
# `device`) on LRP_TEST_DEVICE, here CUDA; without a GPU each skips with the reason. TEST_DEVICE=cuda:1 picks another.
TEST_DEVICE ?= cuda
test-gpu: setup lxt-overlay
	LRP_TEST_DEVICE=$(TEST_DEVICE) LRP_LXT_OVERLAY=$(abspath $(LXT_OVERLAY)) $(PY) -m pytest -m device -rs

demo: setup
	$(VENV)/bin/lrp demo

bench: setup
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/evaluate_speed.py
	$(PY) benchmarks/serve_latency.py

coverage: setup
	$(PY) scripts/coverage.py --out docs/coverage.md

clean:
	rm -rf lrp-demo .pytest_cache build src/*.egg-info
