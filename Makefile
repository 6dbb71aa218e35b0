# Two commands do all set-up on a fresh Debian/Ubuntu machine:
#   make demo   train the embedded default job (synthetic data, 2 MPI ranks, CPU)
#   make test   run the test suite (what CI runs, with make lint)
# While developing: make test-fast (no ranks, Slurm, Docker, network namespaces or slow tests; seconds), make lint,
# make typecheck (mypy on core, engine, generator), make docs (the site, docs/_build/html; warnings are errors).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DOCS_STAMP = $(VENV)/.docs-installed

.PHONY: venv horovod tensorflow demo test test-fast lint typecheck docs bench clean

venv: $(STAMP)

$(STAMP): requirements/test.txt requirements/federated.txt requirements/export.txt pyproject.toml cluster/install-deps.sh
	bash cluster/install-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/test.txt
	$(BIN)/pip install -q -r requirements/federated.txt -c requirements/test.txt
	$(BIN)/pip install -q -r requirements/export.txt -c requirements/test.txt -c requirements/federated.txt
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

test: venv $(DOCS_STAMP)
	bash cluster/install-deps.sh test
	$(BIN)/python -m pytest -q

FAST = not (ranks or slurm or docker or multihost or browser or slow)
test-fast: venv
	$(BIN)/python -m pytest -q -m "$(FAST)"

lint: venv
	$(BIN)/ruff check autocnnp tests benchmarks examples docs

# mypy (pinned in requirements/test.txt) on the layers listed in pyproject.toml's [tool.mypy]
typecheck: venv
	$(BIN)/mypy

# Sphinx (pinned in requirements/docs.txt); the reference is generated from the code (docs/_ext), so every
# page is read again each time (-E): a few seconds
$(DOCS_STAMP): $(STAMP) requirements/docs.txt
	$(BIN)/pip install -q -r requirements/docs.txt -c requirements/test.txt
	touch $@

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	@echo "the site: docs/_build/html/index.html"

bench: venv
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) xml_configs/runs docs/_build
