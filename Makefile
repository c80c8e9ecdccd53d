# Every target creates/reuses .venv and installs the project with its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test test-installed test-pythons test-soak bench bench-quick lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py
	$(PY) -m hwf_jupyter.cli run-notebook notebooks/quickstart.ipynb

# JupyterLab on 127.0.0.1 whose kernels load the extension at start
# (a project-local IPython profile; your own ~/.ipython is not touched).
LAB_IPYTHONDIR := $(abspath $(VENV)/ipython)
LAB_DIR ?= notebooks
lab: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lab]'
	mkdir -p $(LAB_IPYTHONDIR)/profile_default
	echo 'c.InteractiveShellApp.extensions = ["hwf_jupyter.preload"]' > $(LAB_IPYTHONDIR)/profile_default/ipython_kernel_config.py
	IPYTHONDIR=$(LAB_IPYTHONDIR) $(PY) -m jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir $(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Debian's Chromium for the status page's browser tests (Playwright cannot
# download its own browsers here).  Needs root for apt-get; if it cannot be
# installed, the browser tests skip and say why, and the rest still runs.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then echo "browser: $(CHROMIUM) present"; \
	else (apt-get update && apt-get install -y --no-install-recommends chromium) \
	  || echo "browser: could not install chromium; the browser tests will skip"; fi

# The editable suite, then the wheel installed in a fresh venv outside the checkout.
test: $(STAMP) browser
	$(PY) -m pytest -q
	$(PY) tests/installed/smoke.py

test-installed: $(STAMP)
	$(PY) tests/installed/smoke.py

# The installed-wheel smoke test on every CPython 3.10-3.13 found on this machine.
test-pythons: $(STAMP)
	$(PY) tests/installed/smoke.py --pythons all

test-soak: $(STAMP)
	HWF_SOAK_TASKS=20000 $(PY) -m pytest -q -m soak

# HWF against Dask distributed and ipyparallel (pinned in bench/requirements.txt),
# in a venv of its own: the test venv never gets the peers.  BENCH_ARGS=--quick
# (or `make bench-quick`) for a small fast pass; see bench/run.py --help.
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml bench/requirements.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet -e . -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) bench/run.py $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BENCH_PY) bench/run.py --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) hwf_artifacts .pytest_cache build *.egg-info
