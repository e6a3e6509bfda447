# Two entry points: `make demo` and `make test`. Both build .venv from scratch if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The pinned CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf runs/tiny_cpu  # each demo is a fresh run (its checkpoints would otherwise resume it)
	$(BIN)/python -m launch.train --recipe configs/recipes/tiny_cpu.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -x -q tests

bench: $(STAMP)
	$(BIN)/python bench/bench_moe_layer.py

clean:
	rm -rf $(VENV) runs
