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

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/mnist run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) outputs .state build *.egg-info
