# User-facing targets (depth-study, report, ui) install the project alone; `make test` adds its
# test extras (pytest and pytest-xdist, Ray so the Ray launcher is tested too, Playwright for the
# browser test), which a study does not need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
STUDY  ?= experiments/fashion_mnist.toml
STUDY_ARGS ?=
DIAGNOSE_ARGS ?=
BENCH_ARGS ?=
# two pytest workers, one test file each at a time (module fixtures are built once): the suite
# took 15.6 min serially and 11.7 min this way on 2 cores (docs/benchmarks.md)
PYTEST_ARGS ?= -n 2 --dist loadfile
PORT   ?= 5000
APT_GET ?= apt-get
# exits 3 when the study needs Fashion-MNIST and it is neither here nor downloadable
FASHION_MNIST_MISSING ?= $(BIN)/python scripts/fashion_mnist_missing.py $(STUDY)
DATA_PACKAGE := dataset-fashion-mnist
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: setup test data depth-study report ui bench bench-report clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(TEST_STAMP)

setup: $(STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fashion-MNIST for a study that uses it: found or downloaded by torchvision first (resnet_lab.data);
# else Debian's dataset-fashion-mnist, installed when this user may (root, or passwordless sudo);
# else one line saying how. Installing system packages is this target's job, not the library's.
data: setup
	@$(FASHION_MNIST_MISSING) 2>/dev/null; [ $$? -eq 3 ] || exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=no; fi; \
	if [ "$$sudo" = no ] || ! command -v $(APT_GET) >/dev/null; then \
	  echo "make data: Fashion-MNIST is not on this machine and could not be downloaded: run 'sudo apt-get install $(DATA_PACKAGE)' (or set FASHION_MNIST_DIR) and start again" >&2; exit 2; fi; \
	echo "make data: Fashion-MNIST is not on this machine and could not be downloaded; installing Debian's $(DATA_PACKAGE): $${sudo:+$$sudo }$(APT_GET) install -y -q $(DATA_PACKAGE)" >&2; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$sudo $(APT_GET) install -y -q $(DATA_PACKAGE) >/dev/null 2>&1 || \
	{ $$sudo $(APT_GET) update -q >/dev/null 2>&1; $$sudo $(APT_GET) install -y -q $(DATA_PACKAGE) >/dev/null; } || \
	{ echo "make data: installing $(DATA_PACKAGE) failed: run 'sudo apt-get install $(DATA_PACKAGE)' by hand (or set FASHION_MNIST_DIR) and start again" >&2; exit 2; }

# Trains what is not done yet (rerunning resumes), runs the diagnostics the finished runs lack
# (`resnet-lab diagnose`, also resumable), then writes reports/<study>/ and prints its path.
# The report is written even when some runs or diagnostics failed (it lists what is missing); the
# exit status keeps the first failure.
depth-study: setup data
	@status=0; $(BIN)/resnet-lab study $(STUDY) $(STUDY_ARGS) || status=$$?; \
	if [ $$status -eq 0 ] || [ $$status -eq 1 ]; then \
	  $(BIN)/resnet-lab diagnose $(STUDY) $(DIAGNOSE_ARGS) || { d=$$?; [ $$status -ne 0 ] || status=$$d; }; \
	  $(BIN)/resnet-lab report $(STUDY) || exit $$?; fi; \
	exit $$status

report: setup
	$(BIN)/resnet-lab report $(STUDY)

# Prints the URL of the study's runs view once the MLflow server answers; Ctrl-C stops it.
ui: setup
	@$(BIN)/resnet-lab ui $(STUDY) --port $(PORT)

bench: setup
	$(BIN)/python benchmarks/probe_overhead.py $(BENCH_ARGS) --csv benchmarks/results/probe_overhead.csv
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS) --csv benchmarks/results/throughput.csv

bench-report: setup
	$(BIN)/python benchmarks/report_time.py --csv benchmarks/results/report_time.csv

clean:
	rm -rf $(VENV) .pytest_cache
