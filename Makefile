# Two commands do everything on a fresh machine:
#   make run   - set up .venv, then evaluate the default pipeline (SciFact, BM25)
#   make test  - set up .venv, then run the test suite
VENV := .venv
RAGKIT := $(VENV)/bin/ragkit
CONFIG ?= configs/scifact-bm25.toml

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(RAGKIT) eval $(CONFIG)

test: setup
	@bash scripts/test-deps.sh
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(RAGKIT) bench retrieval
	$(RAGKIT) bench cache

clean:
	rm -rf indexes runs report .ragkit
