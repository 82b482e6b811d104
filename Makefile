# Two entry points: `make demo` (the embedded default job) and `make test` (lint + test suite).
# Each creates the virtual environment on first use; torch is pinned to the CPU build.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,iqa,plot]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/qlis demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_compress.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_archive.py
	$(BIN)/python benchmarks/bench_iqa.py
	$(BIN)/python benchmarks/bench_rd.py
	$(BIN)/python benchmarks/bench_rd_speed.py
	$(BIN)/python benchmarks/bench_runtime.py
