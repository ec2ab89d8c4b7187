# Set-up is implicit: every target creates the virtual environment when missing
# and reinstalls the project when pyproject.toml changes.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
SHARED_MNIST := $(abspath ../shared/datasets/mnist)

# Offline machines: use the MNIST files beside the checkout when they exist.
ifneq ($(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),)
export MNIST_DATA_DIR ?= $(SHARED_MNIST)
endif
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The project's Prefect database and profiles stay in the project (as the mnist command keeps them),
# not in ~/.prefect, shared with every other Prefect project; set PREFECT_HOME to choose another.
export PREFECT_HOME ?= $(CURDIR)/.state/prefect
$(shell mkdir -p "$(PREFECT_HOME)")  # Prefect makes its home, but not the folders above it

PREFECT_LOCAL_API := http://127.0.0.1:4200/api

.PHONY: install run serve test faults docs chromium bench prefect deploy worker image demo-data clean

# setuptools prints an "Editable installation" notice per editable package (two here), as a
# warning pip cannot quiet; the filter drops that notice only, every other warning still shows.
QUIET_EDITABLE := ignore:Editable installation

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="$(QUIET_EDITABLE)" $(BIN)/python -m pip install --quiet -e "clients/python[images]" -e ".[trainer,dev]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/mnist run

# The serving stack until Ctrl-C: model server, sync sidecar and logging gateway (gRPC :8500, REST :8501).
serve: install
	$(BIN)/mnist up

test: install chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fault injection with real processes (killed workers, full disks, store outages, races): minutes.
faults: install
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

# The reference pages under docs/ as a site in build/site (strict: a broken link fails).
docs: install
	$(BIN)/mkdocs build --strict

# The browser test drives Debian's chromium (Playwright cannot download its own offline).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

bench: install
	$(BIN)/python bench/run.py

# The growing-data demonstration: a synthetic new source of digits (MNIST training digits rendered
# as another scanner gives them), ingested, then a retrain gated per slice. Needs a stable version
# trained on MNIST alone first (make run, or the mnist train this runs when there is none).
DEMO_DIR ?= .state/demo/scanner-b
demo-data: install
	$(BIN)/python -m tasks.synthetic $(DEMO_DIR) --count 3000
	$(BIN)/mnist registry list --json | grep -q '"stable"' || $(BIN)/mnist train
	-$(BIN)/mnist data add $(DEMO_DIR) --source scanner-b
	$(BIN)/mnist train

# The Prefect UI at http://127.0.0.1:4200, on SQLite in .state/prefect (PREFECT_HOME).
prefect: install
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Work pool, deployments (prefect.yaml) and automations, on PREFECT_API_URL or the local server.
deploy: install
	PREFECT_API_URL=$${PREFECT_API_URL:-$(PREFECT_LOCAL_API)} $(BIN)/mnist deploy

# Two images: training jobs and mnist serve (Docker and Kubernetes pools), and the TF-free sidecars.
IMAGE ?= mnist-pipeline:latest
SIDECAR_IMAGE ?= mnist-sidecar:latest
image:
	docker build -f serving/deploy/Dockerfile --target trainer -t $(IMAGE) .
	docker build -f serving/deploy/Dockerfile --target sidecar -t $(SIDECAR_IMAGE) .

worker: install
	PREFECT_API_URL=$${PREFECT_API_URL:-$(PREFECT_LOCAL_API)} $(BIN)/mnist worker

clean:
	rm -rf $(VENV) outputs .state build *.egg-info
