# Every target creates/reuses .venv and installs the project with its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-soak bench lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py
	$(PY) -m hwf_jupyter.cli run-notebook notebooks/quickstart.ipynb

lab: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lab]'
	$(PY) -m jupyter lab --ip 127.0.0.1 --notebook-dir notebooks

test: $(STAMP)
	$(PY) -m pytest -q

test-soak: $(STAMP)
	HWF_SOAK_TASKS=20000 $(PY) -m pytest -q -m soak

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) hwf_artifacts .pytest_cache
