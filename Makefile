# Every target reuses one setup step: a .venv with the project and its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= experiments/fashion_mnist.toml
PYTEST_ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup test depth-study report ui bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

depth-study: setup
	@echo "make depth-study: the study runner arrives with the depth-study issue; for now train one net with" >&2
	@echo "  $(BIN)/resnet-lab train --model plain-20 --dataset fashion-mnist --iterations 2000" >&2
	@exit 1

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

bench: setup
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
