# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphlora-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m graphlora demo

# one worker per core (pytest-xdist), each test file on one worker so module fixtures are built once
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
