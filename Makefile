# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision as this project's machines have them on disk; override for other platforms,
# e.g. make setup TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: setup data demo test test-slow bench lint docs wheel clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte" ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or pass --data-dir/--download to acnet"; \
	fi

demo: setup data
	$(PY) -m acnet reproduce --preset quick --out runs/quick --jobs 2

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: setup
	PY=$(PY) benchmarks/run_bench.sh

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

# NO_MKDOCS_2_WARNING mutes material's end-of-life notice (May 2027), which is not about these
# pages; --strict still fails the build on any warning about them
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
