# Every target reuses one setup step: a .venv with the project and its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
STUDY  ?= experiments/fashion_mnist.toml
STUDY_ARGS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=
PORT   ?= 5000
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup test depth-study report ui bench bench-report clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Trains what is not done yet (rerunning resumes), then writes reports/<study>/ and prints its path.
# The report is written even when some runs failed (they are listed in it); the exit status keeps the failure.
depth-study: setup
	@status=0; $(BIN)/resnet-lab study $(STUDY) $(STUDY_ARGS) || status=$$?; \
	if [ $$status -eq 0 ] || [ $$status -eq 1 ]; then $(BIN)/resnet-lab report $(STUDY) || exit $$?; fi; \
	exit $$status

report: setup
	$(BIN)/resnet-lab report $(STUDY)

# Prints the URL of the study's runs view once the MLflow server answers; Ctrl-C stops it.
ui: setup
	$(BIN)/resnet-lab ui $(STUDY) --port $(PORT)

bench: setup
	$(BIN)/python benchmarks/probe_overhead.py $(BENCH_ARGS) --csv benchmarks/results/probe_overhead.csv
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS) --csv benchmarks/results/throughput.csv

bench-report: setup
	$(BIN)/python benchmarks/report_time.py --csv benchmarks/results/report_time.csv

clean:
	rm -rf $(VENV) .pytest_cache
