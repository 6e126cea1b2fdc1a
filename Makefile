# rslib: `make demo` runs the main job, `make test` the test suite, `make lab` JupyterLab; each sets up .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rslib-installed

.PHONY: setup demo test bench tutorial sync lint lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rslib run params/demo.yaml --jobs 2

lab: $(STAMP)
	$(VENV)/bin/rslib lab

tutorial: $(STAMP)
	$(VENV)/bin/rslib run params/tutorial.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_noise_sampling.py
	$(PY) benchmarks/bench_tables.py
	$(PY) benchmarks/bench_train_epoch.py
	$(PY) benchmarks/bench_certify.py

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync --update-metadata "$$($(PY) -m rslib.lab --notebook-metadata)" notebooks/*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check rslib tests benchmarks notebooks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) outputs .pytest_cache
