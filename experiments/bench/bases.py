"""Pretrained bases the LeMo benchmarks share, cached by their settings."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

from experiments import run_configs
from experiments.configs import pretrain_small
from tokensparse import data
from tokensparse.pipelines import pretrain


def default_base_workdir(s: dict) -> pathlib.Path:
    """``<cache>/bench/lemo_quality/<preset>-T<base_seq_len>-s<base_steps>-b<base_batch_size>``."""
    name = f"{s['preset']}-T{s['base_seq_len']}-s{s['base_steps']}-b{s['base_batch_size']}"
    return data.cache_dir() / "bench" / "lemo_quality" / name


def pretrain_base(s: dict, workdir: pathlib.Path, *, attention: str = "auto",
                  log: Callable[[str], None] = print) -> dict:
    """Pretrain the base ``s`` describes into ``workdir``, or reuse it when that run finished."""
    done = workdir / "summary.json"
    if done.exists():
        log(f"reusing the base in {workdir}")
        return json.loads(done.read_text())
    log(f"pretraining {s['preset']} at T={s['base_seq_len']} for {s['base_steps']} steps into {workdir}")
    c = pretrain_small.get_config()
    c.model = run_configs.model_dict(s["preset"], max_positions=s["base_seq_len"])
    c.data.vocab_size = s["vocab_size"]
    c.train.seq_len, c.train.steps = s["base_seq_len"], s["base_steps"]
    c.train.batch_size = s["base_batch_size"]
    c.train.checkpoint_every = max(s["base_steps"] // 4, 1)
    c.train.log_every = max(min(c.train.log_every, s["base_steps"]), 1)
    c.attention_backend = attention
    return pretrain.pretrain(run_configs.pretrain_config(c), workdir)
