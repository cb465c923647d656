# Two commands do everything on a fresh machine:
#   make run   - set up .venv, evaluate the default pipeline (SciFact, BM25), then retrieve and answer a
#                few MuSiQue questions with chunk-KV reuse (query, checked against full prefill) and
#                write the HTML leaderboard of every run
#   make test  - set up .venv, then run the test suite
VENV := .venv
RAGKIT := $(VENV)/bin/ragkit
CONFIG ?= configs/scifact-bm25.toml
# The answer demo: 4 held-out MuSiQue questions, 2 retrieved passages each, cache warmed for them first.
DEMO := --set name=musique-rag-demo --set dataset.limit_queries=4 --set generator.chunks=2 \
	--set generator.max_new_tokens=8

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(RAGKIT) eval $(CONFIG)
	$(RAGKIT) cache warm configs/musique-rag.toml $(DEMO) --top 8
	$(RAGKIT) eval configs/musique-rag.toml $(DEMO) --reference full
	$(RAGKIT) report runs --out report --skip-invalid
	@echo "run folders: runs/ (answers: runs/musique-rag-demo/answers.jsonl); report: report/leaderboard.html"

test: setup
	@bash scripts/test-deps.sh
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(RAGKIT) bench retrieval
	$(RAGKIT) bench cache

clean:
	rm -rf indexes runs report .ragkit
