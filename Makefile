# Two entry points for a fresh machine:
#   make demo   venv + install + Fashion-MNIST + pretrain the fmnist_tiny preset + k-NN score
#   make test   venv + install + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RUN ?= runs/fmnist_tiny

.PHONY: demo test test-all lint setup data bench clean

demo: setup data
	$(VENV)/bin/ibot pretrain preset=fmnist_tiny run.output_dir=$(RUN)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check ibot tests benchmarks examples && $(VENV)/bin/ruff format --check ibot tests benchmarks examples

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data:
	scripts/get_data.sh fashion_mnist

clean:
	rm -rf runs .pytest_cache
