"""LeMo selection rules: the zero-step loss of the sparse forward with each rule, and its cost.

    python -m experiments.bench.lemo_selection --out bench_results/lemo_selection.json
    python -m experiments.bench.lemo_selection --smoke --out /tmp/lemo_selection.json  # tiny, random

On SmolLM2-135M (:func:`tokensparse.zoo.load`), no training (the sparse forward of the frozen model,
:func:`tokensparse.lemo.sparse_forward_loss`): for every rule of ``--rules``
(:mod:`tokensparse.lemo.rules`), sequence length of ``--seq_lens`` and keep ratio of ``--keeps``, the
mean next-token loss with the ``half`` schedule (layers 14-28 of 30 sparse), 64-token blocks and
block 0 always kept (``--keep_first_block``), eliminated blocks attending to the first block and
themselves (``--eliminated=sink_local``, the default; ``pass``: the spec's pass-through), each layer
selecting from its own input inside the forward; and the dense loss. On two text sets,
``--windows`` windows each, in one batch:

- ``shakespeare``: the library's held-out windows (:func:`tokensparse.lemo.analysis.
  held_out_windows`: the first ``--windows`` of the held-out works, from their middles);
- ``english``: held-out English the project never trains, tunes or tests on
  (:func:`tokensparse.data.heldout.english_windows`).

The layers before the first sparse one are dense, so their output is computed once per length and
each rule runs only the rest (the same numbers as the whole sparse forward; a test checks it).

``--sensitivity``: per rule, the ``sensitivity`` profile (:mod:`tokensparse.lemo.profiles.
sensitivity`) at keep ``--sensitivity_keep`` within ``--loss_budget`` nats, calibrated on the
shakespeare windows at ``--sensitivity_seq_len``: how many layers fit, and the profile's loss on
both sets. The candidates are the same for every rule, the half schedule's sparse layers
(``--sensitivity_layers=schedule``; ``all``: every layer a rule can select in, which differs
between rules: the learned selector has weights for layers 14-28 only).

``--flops``: each rule's selection cost, compile-only, on the ``--flops_preset`` shape at
``--flops_seq_len``: compiled matmul FLOPs (:func:`tokensparse.flops.compiled_flops`) of one layer's
scores, times the sparse layers of the default schedule, against the compiled FLOPs of the LeMo
LoRA step (default LeMoConfig, ``random`` selection: nearly free) to which it would be added
(``learned`` is priced with zero weights of the preset's shape: the same FLOPs).
``--selector_weights``: the ``learned`` rule measures these weights instead of the shipped ones
(recorded in the settings).

Rows: ``kind`` = ``loss`` (rule, seq_len, keep, per set: loss and loss minus dense), ``dense``,
``sensitivity``, ``flops``. Summary: ``best_<set>@<keep>@<T>`` (the rule with the lowest loss),
``delta_<rule>_<set>@<keep>@<T>``, ``beats_random_everywhere_<rule>`` (on both sets, every length and
keep ratio), ``sensitivity_layers_<rule>``, ``selection_flops_share_<rule>``. Every row records the
LeMo config (selector and ``score_*`` flags included).
"""

from __future__ import annotations

import dataclasses
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import _checks, plots  # noqa: F401  (plots: imported up front, see below)
from experiments.bench import inputs, write_result
from experiments.bench.selection_losses import first_sparse, masked_row_losses, prefix, row_losses
from tokensparse import flops, routing
from tokensparse.config import LEMO_ELIMINATED_MODES, LeMoConfig, preset
from tokensparse.data import heldout
from tokensparse.data.batching import Batch
from tokensparse.layer_loop import Layer
from tokensparse.lemo import analysis, learned_selector, rules
from tokensparse.lemo.forward import check_lemo
from tokensparse.lemo.profiles import sensitivity as sensitivity_profile
from tokensparse.llama import DecoderBlock

# Every module a stage uses is imported up front: a long run does not import from a tree that may
# change under it.

_OUT = flags.DEFINE_string("out", "bench_results/lemo_selection.json", "Where to write the JSON.")
_RULES = flags.DEFINE_list("rules", ["learned", "oracle", "random", "attention_ratio", "attention_mass",
                                     "recent", "ratio_mass"], "Selection rules to measure (learned: "
                           "the library's default).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048"], "Window lengths.")
_KEEPS = flags.DEFINE_list("keeps", ["0.4", "0.55", "0.7", "0.85"], "Keep ratios.")
_WINDOWS = flags.DEFINE_integer("windows", 2, "Windows per text set.")
_KEEP_FIRST = flags.DEFINE_bool("keep_first_block", True, "Always keep block 0.")
_ELIMINATED = flags.DEFINE_enum("eliminated", LeMoConfig().eliminated, list(LEMO_ELIMINATED_MODES),
                                "What eliminated blocks get (LeMoConfig.eliminated): sink_local "
                                "(the default) attends to the first block and themselves; pass: "
                                "nothing (the spec).")
_LOSSES = flags.DEFINE_bool("losses", True, "Measure the loss grid (rules x lengths x keeps).")
_SENSITIVITY = flags.DEFINE_bool("sensitivity", True, "Measure the sensitivity profile per rule.")
_SENS_WINDOWS = flags.DEFINE_integer("sensitivity_windows", 2,
                                     "Shakespeare windows the sensitivity profile calibrates on.")
_SENS_SEQ = flags.DEFINE_integer("sensitivity_seq_len", 1024, "Calibration window length.")
_SENS_KEEP = flags.DEFINE_float("sensitivity_keep", 0.5, "Keep ratio of the sensitivity profile.")
_BUDGET = flags.DEFINE_float("loss_budget", 0.05, "Nats the sensitivity profile may cost.")
_SENS_LAYERS = flags.DEFINE_enum(
    "sensitivity_layers", "schedule", ["schedule", "all"], "Candidate layers of the sensitivity "
    "profile: schedule, the half schedule's sparse layers for every rule (the same candidates for "
    "each, and the layers the shipped learned selector has weights for); all, every layer a rule "
    "can select in (about 4x the probes on SmolLM2).")
_FLOPS = flags.DEFINE_bool("flops", True, "Measure each rule's selection cost (compile-only).")
_FLOPS_PRESET = flags.DEFINE_string("flops_preset", "llama2-7b", "Shape for the selection cost.")
_FLOPS_SEQ = flags.DEFINE_integer("flops_seq_len", 8192, "Sequence length for the selection cost.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny random model and short windows (tests).")
_SELECTOR_WEIGHTS = flags.DEFINE_string(
    "selector_weights", None, "Learned-selector weights (.npz from experiments.train_selector) to "
    "attach instead of the shipped ones: the ``learned`` rule then measures these.")
_MERGE = flags.DEFINE_list("merge", [], "Instead of measuring: merge these results of this "
                           "benchmark (run in pieces, e.g. one length each) into --out.")

_checks.int_list(_SEQ_LENS, multiple_of=64, why="LeMo keeps whole 64-token blocks")

SETS = ("shakespeare", "english")


def text_windows(tokenizer, seq_len: int, count: int, smoke: bool) -> dict[str, np.ndarray]:
    """``{set: [count, seq_len] int32}`` for :data:`SETS`."""
    english_windows = heldout.english_windows
    if smoke:  # a tiny corpus-free stand-in for Shakespeare: the English text, elsewhere
        shakespeare = english_windows(tokenizer, seq_len, 2 * count)[count:]
    else:
        shakespeare = analysis.held_out_windows(tokenizer, [seq_len], [count])[seq_len]
    return {"shakespeare": np.stack(shakespeare),
            "english": np.stack(english_windows(tokenizer, seq_len, count))}


def lemo_dict(lemo: LeMoConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(lemo).items()
            if k.startswith("score_") or k in ("selector", "block_size", "schedule", "eliminated",
                                               "keep_first_block", "keep_ratio", "profile")}


def losses(model, tokens_by_set, lemo_for, keeps, rule_names, rows: list, save=lambda: None):
    """Dense and per-(rule, keep) losses per set at one length, appended to ``rows`` (``save()``
    after each). Each rule is compiled once per length (:func:`masked_row_losses`; the keep ratio
    is a runtime argument)."""
    sets = list(tokens_by_set)
    tokens = jnp.asarray(np.concatenate([tokens_by_set[s] for s in sets]))
    per_set = len(tokens_by_set[sets[0]])
    n_layers = len(model.layers)
    seq_len = int(tokens.shape[1])
    nb = seq_len // lemo_for(rule_names[0], keeps[0]).block_size
    start = first_sparse(lemo_for(rule_names[0], keeps[0]), n_layers)
    hidden = nnx.jit(prefix, static_argnums=2)(model, tokens, start)
    run = nnx.jit(masked_row_losses, static_argnums=(3, 4))

    def by_set(values):
        values = np.asarray(values)
        return {s: float(values[i * per_set:(i + 1) * per_set].mean()) for i, s in enumerate(sets)}

    marker = lemo_for(rule_names[0], 0.5)  # marks the sparse layers; k_blocks = n_b: dense
    dense = by_set(run(model, hidden, tokens, marker, start, jnp.int32(nb)))
    rows.append({"kind": "dense", "seq_len": seq_len, **{f"loss_{s}": v for s, v in dense.items()}})
    print(f"T={seq_len} dense " + " ".join(f"{s} {v:.3f}" for s, v in dense.items()), flush=True)
    for name in rule_names:
        for keep in keeps:
            lemo = lemo_for(name, keep)
            check_lemo(model, lemo, seq_len, training=False)
            k_blocks = routing.capacity(nb, keep, rounding="floor")
            t0 = time.perf_counter()
            got = by_set(run(model, hidden, tokens, lemo_for(name, 0.5), start,
                             jnp.int32(k_blocks)))
            row = {"kind": "loss", "rule": name, "seq_len": seq_len, "keep": keep,
                   "kept_blocks": k_blocks, "blocks": nb,
                   **{f"loss_{s}": v for s, v in got.items()},
                   **{f"delta_{s}": got[s] - dense[s] for s in sets},
                   "seconds": time.perf_counter() - t0, "lemo": lemo_dict(lemo)}
            rows.append(row)
            print(f"T={seq_len} {name:>16} keep {keep:.2f} " + " ".join(
                f"{s} {got[s]:.3f} ({got[s] - dense[s]:+.3f})" for s in sets)
                  + f"  {row['seconds']:.0f}s", flush=True)
            save()


def dense_set_losses(model, tokens_by_set, lemo: LeMoConfig) -> dict[str, float]:
    """The dense forward's mean loss on every set (once for all the sensitivity rows)."""
    run = nnx.jit(row_losses, static_argnums=(3, 4))
    dense = lemo.replace(schedule="all", keep_ratio=1.0)
    return {s: float(np.mean(run(model, model.embed(jnp.asarray(t)), jnp.asarray(t), dense, 0)))
            for s, t in tokens_by_set.items()}


def sensitivity(model, calibration, tokens_by_set, lemo: LeMoConfig, keep: float, budget: float,
                layers, dense: dict[str, float]):
    """The sensitivity profile for ``lemo.selector`` over the candidate ``layers`` (None: every
    layer the rule can select in) and its loss on every set, and that minus ``dense``
    (:func:`dense_set_losses`)."""
    batch = Batch(jnp.asarray(calibration), None, None)
    costs = sensitivity_profile.layer_costs(model, [batch], lemo, keep, layers=layers)[0]
    profile = sensitivity_profile.budget_profile(costs, keep, budget)
    profiled = lemo.replace(schedule="profile", profile=profile)
    run = nnx.jit(row_losses, static_argnums=(3, 4))
    out = {"kind": "sensitivity", "rule": lemo.selector, "keep": keep, "budget": budget,
           "seq_len": int(calibration.shape[1]), "profile": list(profile),
           "candidates": None if layers is None else sorted(layers),
           "layers": int(sum(r < 1.0 for r in profile)),
           "costs": [float(c) if np.isfinite(c) else None for c in costs]}
    for s, toks in tokens_by_set.items():
        toks = jnp.asarray(toks)
        sparse = run(model, model.embed(toks), toks, profiled, 0)
        out[f"loss_{s}"] = float(np.mean(sparse))
        out[f"delta_{s}"] = float(np.mean(sparse)) - dense[s]
    return out


def selection_flops(preset_name: str, seq_len: int, rule_names, lemo: LeMoConfig) -> list[dict]:
    """Per rule: compiled FLOPs of one layer's scores on the preset's shape (compile-only), times
    the default schedule's sparse layers, against the LeMo LoRA step's compiled FLOPs."""
    config = preset(preset_name, dtype="bfloat16", param_dtype="bfloat16").with_context(seq_len)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderBlock(config, layer=0,
                                                                    rngs=nnx.Rngs(0))))
    h = jax.ShapeDtypeStruct((1, seq_len, config.d_model), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    n_sparse = sum(r < 1.0 for r in lemo.keep_ratios(config.n_layers))
    t0 = time.perf_counter()
    step = flops.compiled_flops(inputs.lowered_lora_step(config, seq_len, "lemo",
                                            lemo=lemo.replace(selector="random")).compile())
    print(f"LeMo step ({preset_name}, T={seq_len}): {step:.3e} FLOPs "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = []
    # The learned rule binds to weights on a model: zeros of the preset's shape cost the same.
    holder = types.SimpleNamespace(lemo_selector=learned_selector.LearnedSelector(
        config.n_layers, config.d_model, layers=range(config.n_layers)))
    for name in rule_names:
        if rules.get(name).bind is not None and name != "learned":  # needs its own model weights
            print(f"{name:>16}: skipped (its cost needs a model with its weights)", flush=True)
            continue
        score = rules.get(name).scorer(holder if name == "learned" else None, lemo)
        rule_lemo = lemo.replace(selector=name)

        def scores(state, h, positions, score=score, rule_lemo=rule_lemo):
            block = nnx.merge(graphdef, state)
            layer = Layer(jnp.int32(20), positions, None, None, None)
            return rules.layer_scores(score, block, h, layer, rule_lemo)

        layer = flops.compiled_flops(jax.jit(scores).lower(state, h, ints).compile())
        rows.append({"kind": "flops", "rule": name, "preset": preset_name, "seq_len": seq_len,
                     "layer_flops": layer, "sparse_layers": n_sparse,
                     "selection_flops": layer * n_sparse, "step_flops": step,
                     "share": layer * n_sparse / (step + layer * n_sparse)})
        print(f"{name:>16}: {layer:.3e} FLOPs per layer, {rows[-1]['share']:.2%} of the step",
              flush=True)
    return rows


def summarise(rows: list[dict], rule_names) -> dict:
    summary = {}
    loss_rows = [r for r in rows if r["kind"] == "loss"]
    for r in loss_rows:
        for s in SETS:
            if f"delta_{s}" in r:
                summary[f"delta_{r['rule']}_{s}@{r['keep']:g}@{r['seq_len']}"] = r[f"delta_{s}"]
    cells = {(r["seq_len"], r["keep"]) for r in loss_rows}
    for seq_len, keep in sorted(cells):
        mine = [r for r in loss_rows if (r["seq_len"], r["keep"]) == (seq_len, keep)]
        for s in SETS:
            if all(f"loss_{s}" in r for r in mine):
                summary[f"best_{s}@{keep:g}@{seq_len}"] = min(mine, key=lambda r: r[f"loss_{s}"])["rule"]
    if "random" in rule_names:
        rand = {(r["seq_len"], r["keep"]): r for r in loss_rows if r["rule"] == "random"}
        for name in rule_names:
            if name == "random":
                continue
            mine = [r for r in loss_rows if r["rule"] == name  # (cells random has measured)
                    and (r["seq_len"], r["keep"]) in rand]
            summary[f"beats_random_everywhere_{name}"] = bool(mine) and all(
                r[f"loss_{s}"] < rand[(r["seq_len"], r["keep"])][f"loss_{s}"]
                for r in mine for s in SETS if f"loss_{s}" in r)
    for r in rows:
        if r["kind"] == "sensitivity":
            summary[f"sensitivity_layers_{r['rule']}"] = r["layers"]
            summary[f"sensitivity_delta_english_{r['rule']}"] = r.get("delta_english")
        if r["kind"] == "flops":
            summary[f"selection_flops_share_{r['rule']}"] = r["share"]
    return summary


def merge(paths, out: str) -> dict:
    """One result from pieces of one measurement (e.g. run in parallel, one length each): rows
    concatenated in order, the summary recomputed, settings of the first with every piece's."""
    import json
    import pathlib

    pieces = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    rows = [r for piece in pieces for r in piece["rows"]]
    rule_names = list(dict.fromkeys(r for piece in pieces for r in piece["settings"]["rules"]))
    settings = {**pieces[0]["settings"], "pieces": [
        {k: piece["settings"].get(k) for k in ("seq_lens", "seconds", "complete")}
        | {"git": piece.get("git"), "losses": any(r["kind"] == "loss" for r in piece["rows"])}
        for piece in pieces]}
    settings["seq_lens"] = sorted({r["seq_len"] for r in rows if r["kind"] == "loss"})
    return write_result(out, "lemo_selection", rows, summarise(rows, rule_names),
                        settings=settings)


def main(argv):
    del argv
    if _MERGE.value:
        merge(_MERGE.value, _OUT.value)
        print(f"wrote {_OUT.value}")
        return
    start_time = time.perf_counter()
    smoke = _SMOKE.value
    model, tokenizer, name = inputs.selection_model(smoke)
    if _SELECTOR_WEIGHTS.value:
        learned_selector.attach(model, learned_selector.load(_SELECTOR_WEIGHTS.value, model.config))
    rule_names = list(_RULES.value)
    for r in rule_names:
        rules.get(r)  # unknown names fail before any work
    keeps = [float(k) for k in _KEEPS.value]
    base = LeMoConfig(keep_first_block=_KEEP_FIRST.value, mlp_mode="dense",
                      eliminated=_ELIMINATED.value)

    def lemo_for(rule, keep):
        return base.replace(selector=rule, keep_ratio=keep)

    selector = learned_selector.attached(model)
    settings = {"model": name,
                "learned_selector": None if selector is None else {
                    "file": _SELECTOR_WEIGHTS.value or "shipped", **selector.spec()},
                "seq_lens": [int(t) for t in _SEQ_LENS.value], "keeps": keeps,
                "windows": _WINDOWS.value, "rules": rule_names, "schedule": "half",
                "keep_first_block": _KEEP_FIRST.value, "eliminated": _ELIMINATED.value,
                "block_size": base.block_size,
                "sets": {"shakespeare": "tokensparse.lemo.analysis.held_out_windows",
                         "english": "tokensparse.data.heldout.english_windows"},
                "score_options": {k: v for k, v in lemo_dict(base).items()
                                  if k.startswith("score_")}}
    rows = []

    def save(final: bool = False):  # after every stage: an interrupted run keeps what it measured
        settings["seconds"] = time.perf_counter() - start_time
        settings["complete"] = final
        write_result(_OUT.value, "lemo_selection", rows, summarise(rows, rule_names),
                     png=None if final else False, settings=settings)

    for seq_len in map(int, _SEQ_LENS.value) if _LOSSES.value else ():
        losses(model, text_windows(tokenizer, seq_len, _WINDOWS.value, smoke), lemo_for, keeps,
               rule_names, rows, save)
    if _FLOPS.value:
        flops_preset = "tiny" if smoke else _FLOPS_PRESET.value
        rows += selection_flops(flops_preset, 256 if smoke else _FLOPS_SEQ.value, rule_names,
                                LeMoConfig(keep_first_block=_KEEP_FIRST.value,
                                           eliminated=_ELIMINATED.value))
        save()
    if _SENSITIVITY.value:
        sets = text_windows(tokenizer, _SENS_SEQ.value, _WINDOWS.value, smoke)
        calibration = sets["shakespeare"][:_SENS_WINDOWS.value]
        candidates = None if _SENS_LAYERS.value == "all" else [
            layer for layer, ratio in enumerate(base.replace(keep_ratio=_SENS_KEEP.value).keep_ratios(
                len(model.layers))) if ratio < 1.0]
        settings["sensitivity_candidates"] = candidates
        dense = dense_set_losses(model, sets, base)
        for r in rule_names:
            if rules.get(r).per_layer:
                continue
            t0 = time.perf_counter()
            rows.append(sensitivity(model, calibration, sets, lemo_for(r, 1.0),
                                    _SENS_KEEP.value, _BUDGET.value, candidates, dense))
            print(f"sensitivity {r}: {rows[-1]['layers']} layers, english "
                  f"{rows[-1]['delta_english']:+.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            save()
    save(final=True)
    print(f"wrote {_OUT.value} ({settings['seconds']:.0f}s)")


if __name__ == "__main__":
    _checks.run(main)
