# The README's two commands: `make demo` and `make test`. Each sets up .venv when absent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch <= 2.14.1 comes from local disk on these machines (see pyproject.toml).
	$(PY) -m pip install -e ".[dev,postgres]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chromobatch demo

test: $(STAMP)
	$(VENV)/bin/ruff check chromobatch tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check chromobatch tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
