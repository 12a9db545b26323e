"""SUBLLM's Balancer at model level: the fraction of positive scores per subsampler along a run.

    python -m experiments.bench.subllm_balancer --out bench_results/subllm_balancer.json \\
        [--preset=subllm-tiny --config.subllm.structure="T(T(T)T)" --steps=2000 --batch_size=64 \\
         --seq_len=128 --lr=3e-4 --warmup_steps=200 --config.subllm.balancer_statistic=proportion \\
         --config.subllm.balancer_margin=0.05 --config.subllm.bypass_init=0.5 --seeds=0,2 --every=50 \\
         --tail=1000]

Pretrains the SUBLLM from scratch on the corpus once per seed, exactly as
:func:`tokensparse.pipelines.pretrain.pretrain` would
(:func:`tokensparse.pipelines.pretrain.subllm_setup` with the ``pretrain_subllm_tiny`` recipe; no
checkpoints or evaluation). ``--config.subllm.<option>`` sets the SUBLLM's options
(:mod:`experiments.bench.subllm_options`; ``--config_help`` lists them): here the structure defaults
to ``T(T(T)T)`` (the backbone gets as many layers as it has T's) and the Balancer's statistic to
``proportion``; the others are the preset's. Every ``--every`` steps, before
the update, it records per subsampler, on that step's batch, at the subsampler's training-capacity
input (a top-k forward): the fraction of positive scores (the inference keep rate's driver; the
Balancer's band is keep ± 0.05), μ/σ and rms of the scores (as the Balancer measures them), and
the bypass scale c.

Summary, per subsampler j, over the recorded steps of the last ``--tail`` steps of every seed:
``positive_fraction_min_<j>`` / ``_mean_<j>`` / ``_max_<j>``, ``in_band_<j>`` (every one of them
inside the band) and ``distance_from_band_<j>`` (the farthest any of them lies outside it). This
is a measurement of training dynamics, not a speed benchmark; see docs/subllm.md, "What the
Balancer can and cannot hold".
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import _checks, run_configs
from experiments.bench import subllm_options, write_result
from experiments.configs import pretrain_subllm_tiny
from tokensparse import data, train
from tokensparse.pipelines import pretrain
from tokensparse.subllm.balancer import balancer_bands, balancer_stats, positive_fraction
from tokensparse.subllm.structure import subllm_preset_names

_PRESET = flags.DEFINE_string("preset", "subllm-tiny", "SUBLLM preset.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per seed.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Rows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Packed row length.")
_LR = flags.DEFINE_float("lr", 3e-4, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
# What the runs here compare against: the proportion statistic, on a two-level cut of the preset.
_OPTIONS = subllm_options.define(structure="T(T(T)T)", balancer_statistic="proportion")
_SEEDS = flags.DEFINE_list("seeds", ["0", "2"], "Seeds (init, data order, coins), run one after another.")
_EVERY = flags.DEFINE_integer("every", 50, "Record the statistics every this many steps.")
_TAIL = flags.DEFINE_integer("tail", 1000, "The summary covers the recorded steps of the last this many.")
_DECOMPOSE = flags.DEFINE_bool("decompose", False, "Also split each recorded change of the scores into "
                               "the part from the scorer's input and the part from its weight (on a "
                               "fixed probe batch; see probe_record).")
_OUT = flags.DEFINE_string("out", "bench_results/subllm_balancer.json", "Where to write the JSON.")

for _holder in (_STEPS, _BATCH, _EVERY, _TAIL):
    _checks.at_least(_holder, 1)
_checks.at_least(_SEQ_LEN, 2)
_checks.at_least(_WARMUP, 0)
_checks.in_range(_LR, 0.0, float("inf"))
_checks.one_of(_PRESET, subllm_preset_names())
flags.register_validator(_SEEDS, lambda v: bool(v) and all(s.strip().isdigit() for s in v),
                         "must be a non-empty list of non-negative integers.")


def settings() -> dict:
    return {"preset": _PRESET.value, "steps": _STEPS.value,
            "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value, "lr": _LR.value,
            "warmup_steps": _WARMUP.value, **subllm_options.values(_PRESET.value),
            "seeds": [int(s) for s in _SEEDS.value], "every": _EVERY.value, "tail": _TAIL.value}


def config(seed: int):
    c = pretrain_subllm_tiny.get_config()
    structure = subllm_options.values(_PRESET.value)["structure"]
    c.subllm = run_configs.subllm_dict(_PRESET.value, overrides={
        "max_positions": max(_SEQ_LEN.value, 128), "n_layers": structure.count("T")})
    subllm_options.apply(c)
    c.train.steps, c.train.batch_size, c.train.seq_len = _STEPS.value, _BATCH.value, _SEQ_LEN.value
    c.train.lr, c.train.warmup_steps, c.train.seed = _LR.value, _WARMUP.value, seed
    return c


def score_stats(scores) -> dict:
    """Fraction positive, μ/σ and rms of one subsampler's scores, as the Balancer measures them."""
    mean, rms, std = balancer_stats(scores)
    return {"positive_fraction": float(positive_fraction(scores)), "mean_std": float(mean / std),
            "rms": float(rms)}


def probe_record(scores_fn, model, probe, previous: list | None) -> dict:
    """Score statistics on the fixed ``probe`` batch, and, given the scorer weights of the previous
    record, the same with level j's weight put back to its previous value (one level at a time).

    Level j's scores are x_j · w_j, and x_j does not depend on w_j, so the swapped run gives exactly
    x_j(now) · w_j(then). Between two records the change of a statistic splits, exactly, into the
    part from the input, ``old_w(now) − probe(then)``, and the part from the weight,
    ``probe(now) − old_w(now)``. Also recorded: |w_j| and |Δw_j| / |w_j(then)|."""
    record = {}
    for j, scores in enumerate(scores_fn(model, probe)):
        record.update({f"probe_{k}_{j}": v for k, v in score_stats(scores).items()})
    if previous is None:
        return record
    for j, scorer in enumerate(model.scorers):
        now = scorer.weight[...]
        scorer.weight[...] = jnp.asarray(previous[j], now.dtype)
        scores = scores_fn(model, probe)[j]
        scorer.weight[...] = now
        record.update({f"probe_old_w_{k}_{j}": v for k, v in score_stats(scores).items()})
        record[f"scorer_w_norm_{j}"] = float(np.linalg.norm(np.asarray(now)))
        record[f"scorer_w_change_{j}"] = float(np.linalg.norm(np.asarray(now) - previous[j])
                                               / np.linalg.norm(previous[j]))
    return record


def run_seed(seed: int) -> list[dict]:
    c = config(seed)
    corpus = data.load_corpus(c.data.source)
    tokenizer = data.get_tokenizer(corpus, c.data.vocab_size)
    run = run_configs.pretrain_config(c)
    setup = pretrain.subllm_setup(run, tokenizer.get_vocab_size(), run.train)
    tc = run.train
    model = setup.model
    optimizer = nnx.Optimizer(model, setup.tx, wrt=nnx.Param)
    step_fn = train.make_train_step(setup.train_loss, pass_step=True)
    batches = data.PackedBatches(data.encode_documents(tokenizer, corpus.train), batch_size=tc.batch_size,
                                 seq_len=tc.seq_len, seed=seed)
    scores_fn = nnx.jit(lambda m, b: m.forward(b.tokens, b.positions, b.segment_ids,
                                               mode="topk")[1]["scores"])
    probe, previous_w = batches.batch(0), None
    records, start = [], time.perf_counter()
    for step in range(tc.steps):
        batch = batches.batch(step)
        recording = step % _EVERY.value == 0 or step == tc.steps - 1
        if recording:
            record = {"seed": seed, "step": step}
            for j, scores in enumerate(scores_fn(model, batch)):  # every slot is valid: packed rows
                record.update({f"{k}_{j}": v for k, v in score_stats(scores).items()})
                record[f"bypass_c_{j}"] = float(np.asarray(model.bypasses[j].scale[...]).mean())
            if _DECOMPOSE.value:
                record.update(probe_record(scores_fn, model, probe, previous_w))
                previous_w = [np.array(scorer.weight[...]) for scorer in model.scorers]  # host copies
        metrics = step_fn(model, optimizer, batch)
        if recording:
            record["loss"] = float(metrics["loss"])
            records.append(record)
            levels = ", ".join(f"level {j + 1} {record[f'positive_fraction_{j}']:.3f}"
                               for j in range(model.structure.n_subsamplers))
            print(f"seed {seed} step {step}: {levels}, loss {record['loss']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return records


def summarize(records: list[dict], keep: float | tuple, steps: int, tail: int) -> dict:
    n_sub = sum(1 for k in records[0] if k.startswith("positive_fraction_"))
    keeps = [keep] * n_sub if isinstance(keep, float) else list(keep)
    summary = {}
    for j in range(n_sub):
        lo, hi = balancer_bands(keeps[j]).proportion
        values = [r[f"positive_fraction_{j}"] for r in records if r["step"] >= steps - tail]
        summary.update({f"positive_fraction_min_{j}": min(values), f"positive_fraction_mean_{j}":
                        float(np.mean(values)), f"positive_fraction_max_{j}": max(values),
                        f"in_band_{j}": bool(lo <= min(values) and max(values) <= hi),
                        f"distance_from_band_{j}": max(max(lo - v, v - hi, 0.0) for v in values),
                        f"band_{j}": [lo, hi]})
    return summary


def main(argv):
    del argv
    _OPTIONS.exit_if_help()
    try:
        keep = run_configs.pretrain_config(config(0)).model.keep
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    records = [r for seed in settings()["seeds"] for r in run_seed(seed)]
    summary = summarize(records, keep, _STEPS.value, _TAIL.value)
    print(summary)
    write_result(_OUT.value, "subllm_balancer", records, summary, png=False, settings=settings())


if __name__ == "__main__":
    _checks.run(main)
