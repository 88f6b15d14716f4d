# Two commands for a fresh machine:  `make demo` (set up + run the pipeline on the demo corpus)
# and `make test` (set up + run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls several GB of CUDA packages.
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/cbtm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,eval]"
	touch $@

setup: $(BIN)/cbtm

demo: setup
	$(BIN)/cbtm run

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
