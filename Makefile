# Two commands do all set-up on a fresh Debian/Ubuntu machine:
#   make demo   train the embedded default job (synthetic data, 2 MPI ranks, CPU)
#   make test   run the test suite (what CI runs, with make lint)
# While developing: make test-fast (no ranks, Slurm, Docker, network namespaces or slow tests; seconds), make lint.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: venv horovod tensorflow demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): requirements/test.txt pyproject.toml cluster/install-deps.sh
	bash cluster/install-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/test.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Horovod 0.28.1 built from source for this torch (dist_strategy horovod); a few minutes, once
horovod: venv
	bash cluster/build-horovod.sh $(VENV)

# TensorFlow 2.21 (CPU) for jobs whose framework action is tensorflow; torch jobs never import it
tensorflow: venv
	$(BIN)/pip install -q -r requirements/tensorflow.txt -c requirements/test.txt
	$(BIN)/python -c "import tensorflow as tf; print('tensorflow', tf.__version__, 'installed')"

demo: venv
	$(BIN)/autocnnp run xml_configs/demo.xml

test: venv
	bash cluster/install-deps.sh test
	$(BIN)/python -m pytest -q

FAST = not (ranks or slurm or docker or multihost or browser or slow)
test-fast: venv
	$(BIN)/python -m pytest -q -m "$(FAST)"

lint: venv
	$(BIN)/ruff check autocnnp tests benchmarks examples

bench: venv
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) xml_configs/runs
