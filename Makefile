# Two commands: `make demo` and `make test`. Both create .venv when it is missing, install the
# project with its pinned dependencies (constraints.txt), and run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -c constraints.txt -e '.[dev]'
	$(PY) -m flows.stores
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/rae run
	$(VENV)/bin/rae leaderboard

test: install
	$(VENV)/bin/ruff check rae_core flows tests bench
	$(VENV)/bin/pytest -q --durations=15

bench: install
	$(PY) bench/demo_timing.py

clean:
	rm -rf data/dataset data/latents models runs mlflow.db mlartifacts .prefect
