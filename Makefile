# Two commands do all setup on a fresh machine:
#   make up    install, then start the service on the embedded default (SQLite, filesystem broker,
#              one worker, tiny local model) and submit a demo run
#   make test  install, then run the whole test suite (SQLite and PostgreSQL + Redis)
PYTHON ?= python3
VENV ?= .venv
# torch is installed first so the project's install keeps this build. Here it is the local CPU
# wheel; on a GPU machine set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install up test lint bench system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/tuneyard up --demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check app worker trainer_core tuneyard_cli migrations tests bench

# Debian packages the browser and compose tests use (CI runs this as root).
system-deps:
	command -v chromium >/dev/null || apt-get install -y -q chromium
	command -v docker-compose >/dev/null || apt-get install -y -q docker-compose
	command -v bwrap >/dev/null || apt-get install -y -q bubblewrap
