"""How local is LeMo's exact query-side rule? Its block ranking from a windowed attention.

    python -m experiments.bench.lemo_window_agreement --out bench_results/lemo_window_agreement.json
    python -m experiments.bench.lemo_window_agreement --smoke --out /tmp/window.json  # tiny, random

The exact ``attention_ratio`` rule scores a token by ‖a_t‖ / ‖h_t‖ with ``a_t`` the layer's causal
attention output over the whole prefix. This probe recomputes ``a_t`` with each query restricted
to the row's first block (the attention sink), its own block and the ``w`` blocks before it
(``--window_blocks``; ``all``: no restriction, which must reproduce the exact rule: a built-in
check), optionally with only some query heads (``--heads``), and reports how well each version
ranks blocks like the exact rule: Spearman per (layer, window) and recall of its kept blocks per
keep ratio (:func:`tokensparse.lemo.learned_selector.ranking_metrics`, block 0 kept in both).
``--output_norms`` also measures cheaper norms of ``a_t`` than through the output projection
(per-head Gram matrices, or W_o cut to its r largest singular directions).

The layer inputs are those of the LeMo sparse forward with the exact rule selecting at
``--sparse_keep`` (as ``experiments.train_selector`` collects them), on ``--windows`` windows of
``--seq_len`` tokens of the held-out English (:func:`tokensparse.data.heldout.english_windows`)
and of Shakespeare's validation split, for layers ``--layers``. It answers what a cheap selector
must see: a rule that agrees with the exact one needs the layer's own attention over a few blocks,
while a per-token predictor sees none of it (docs/lemo.md, "Learned selector").
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import _checks
from experiments.bench import inputs, write_result
from experiments.selector_windows import parse_layers, split_windows
from tokensparse.config import LeMoConfig
from tokensparse.data import heldout
from tokensparse.lemo import learned_selector as ls

_OUT = flags.DEFINE_string("out", "bench_results/lemo_window_agreement.json", "Output JSON.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny random model with a byte tokenizer (a test).")
_WINDOWS = flags.DEFINE_integer("windows", 4, "Windows per text set.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per window (a multiple of --block_size).")
_BLOCK = flags.DEFINE_integer("block_size", 64, "LeMo block size.")
_LAYERS = flags.DEFINE_string("layers", "14-28", "Layers: a range a-b (inclusive) or a comma list.")
_WINDOW_BLOCKS = flags.DEFINE_list("window_blocks", ["0", "1", "2", "4", "all"],
                                   "Blocks before the query's own that it attends to (besides the "
                                   "first block); all: the whole prefix (the exact rule).")
_HEADS = flags.DEFINE_list("heads", ["all"], "Query-head subsets, each a '+'-joined list of head "
                           "indices (e.g. 0+3+6) or all; every subset is measured with every window.")
_OUTPUT_NORMS = flags.DEFINE_list(
    "output_norms", ["exact"], "How ‖a_t‖ is computed from the heads' outputs o_h: exact (through "
    "o_proj), head_gram (Σ_h ‖o_h W_o,h‖², the cross-head terms dropped: each head's dh × dh Gram "
    "matrix of W_o instead of the D × D projection), head (Σ_h ‖o_h‖², W_o ignored), rank<r> "
    "(through W_o's r largest singular directions: an r-column projection instead of D, e.g. "
    "rank192); every norm is measured with every window and head subset.")
_SPARSE_KEEP = flags.DEFINE_float("sparse_keep", 0.7, "Keep ratio of the sparse forward whose layer "
                                  "inputs are probed (the exact rule selecting).")

_checks.at_least(_WINDOWS, 1)
_checks.at_least(_SEQ_LEN, 1)
_checks.at_least(_BLOCK, 1)
_checks.in_range(_SPARSE_KEEP, 0.0, 1.0, include_high=True)


OUTPUT_NORMS = ("exact", "head_gram", "head", "rank<r>")


def output_norm_rank(output_norm: str) -> int | None:
    """r of a ``rank<r>`` output norm (None for the others); a ValueError for an unknown one."""
    if output_norm in OUTPUT_NORMS[:3]:
        return None
    digits = output_norm.removeprefix("rank")
    if output_norm.startswith("rank") and digits.isdigit() and int(digits) > 0:
        return int(digits)
    raise ValueError(f"--output_norms: unknown {output_norm!r}; known: {', '.join(OUTPUT_NORMS)} "
                     "(r a positive integer).")


def windowed_ratios(attn, u, log_rms, variants, block_size: int) -> dict:
    """``{(window_blocks, heads, output_norm): ‖a_t‖ / ‖h_t‖ [T]}`` for every variant, with ``a_t``
    the attention output of ``attn`` over the first block, the query's own block and the
    ``window_blocks`` before it (None: the whole causal prefix), from the query heads ``heads`` only
    (None: all), its norm computed as ``output_norm`` says (see ``--output_norms``). The projections
    and scores are computed once for all variants; ``u`` [T, D] the normed layer input, ``log_rms``
    [T]."""
    t, d = u.shape
    q, k, v = (x.astype(jnp.float32)[0] for x in attn.project_qkv(u[None], jnp.arange(t)[None]))
    group = attn.n_heads // attn.n_kv_heads
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(attn.head_dim)
    i = jnp.arange(t)
    causal = i[None, :] <= i[:, None]
    near = lambda w: (i[:, None] // block_size - i[None, :] // block_size <= w) | (i[None, :] < block_size)
    w_o = attn.o_proj.kernel[...].astype(jnp.float32).reshape(attn.n_heads, attn.head_dim, d)
    gram = jnp.einsum("hde,hfe->hdf", w_o, w_o)
    if any(output_norm_rank(norm) for _, _, norm in variants):  # W_o = L S Rᵀ
        left, singular, _ = jnp.linalg.svd(w_o.reshape(-1, d), full_matrices=False)
    residual = jnp.exp(log_rms) * np.sqrt(d)
    outputs, ratios = {}, {}
    for window_blocks, heads, output_norm in variants:
        if window_blocks not in outputs:
            allowed = causal if window_blocks is None else causal & near(window_blocks)
            weights = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), -1)
            outputs[window_blocks] = jnp.einsum("hqk,khd->qhd", weights, v)
        out = outputs[window_blocks]
        if heads is not None:
            out = out * jnp.zeros(attn.n_heads).at[jnp.asarray(heads)].set(1.0)[None, :, None]
        if output_norm == "exact":
            a = attn.project_out(out[None].astype(u.dtype))[0].astype(jnp.float32)
            norm = jnp.linalg.norm(a, axis=-1)
        elif output_norm == "head_gram":
            norm = jnp.sqrt(jnp.einsum("qhd,hdf,qhf->q", out, gram, out))
        elif (rank := output_norm_rank(output_norm)) is not None:  # ‖o W_o‖ = ‖o L S‖ (R orthogonal)
            norm = jnp.linalg.norm(out.reshape(t, -1) @ left[:, :rank] * singular[:rank], axis=-1)
        else:
            norm = jnp.sqrt(jnp.sum(out * out, axis=(1, 2)))
        ratios[(window_blocks, heads, output_norm)] = np.asarray(norm / residual)
    return ratios


def agreements(model, data: dict, layers, variants, block_size: int, seq_len: int) -> dict:
    """Per variant, the ranking metrics of its windowed ratio against the exact one over ``data``
    (from :func:`learned_selector.collect`)."""
    n_layers, n = data["target"].shape
    predicted = {variant: np.zeros((n_layers, n), np.float32) for variant in variants}
    for i, layer in enumerate(layers):
        attn = model.layers[layer].attn
        for w in range(n // seq_len):
            rows = slice(w * seq_len, (w + 1) * seq_len)
            ratios = windowed_ratios(attn, jnp.asarray(data["u"][i, rows], jnp.float32),
                                     jnp.asarray(data["log_rms"][i, rows]), variants, block_size)
            for variant, ratio in ratios.items():
                predicted[variant][i, rows] = ratio
    blocks = lambda x: x.reshape(n_layers, -1, block_size).mean(-1)
    return {variant: ls.ranking_metrics(blocks(p), blocks(data["target"]),
                                        blocks_per_window=seq_len // block_size,
                                        keeps=(0.4, 0.55, 0.7, 0.85))
            for variant, p in predicted.items()}


def main(argv):
    del argv
    t0 = time.perf_counter()
    block, seq_len = _BLOCK.value, _SEQ_LEN.value
    if seq_len % block:
        raise app.UsageError(f"--seq_len={seq_len} must be a multiple of --block_size={block}.")
    windows = [None if w == "all" else int(w) for w in _WINDOW_BLOCKS.value]
    try:
        for norm in _OUTPUT_NORMS.value:
            output_norm_rank(norm)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if any(w is not None and w < 0 for w in windows):
        raise app.UsageError(f"--window_blocks={_WINDOW_BLOCKS.value}: each is >= 0 or all.")
    model, tokenizer, name = inputs.selection_model(_SMOKE.value)
    n_heads = model.config.n_heads
    try:
        subsets = [None if h == "all" else tuple(sorted({int(x) for x in h.split("+")}))
                   for h in _HEADS.value]
    except ValueError:
        raise app.UsageError(f"--heads={_HEADS.value}: '+'-joined head indices or all.") from None
    if any(s is not None and not 0 <= s[0] <= s[-1] < n_heads for s in subsets):
        raise app.UsageError(f"--heads={_HEADS.value}: the model has heads 0..{n_heads - 1}.")
    layers = parse_layers(_LAYERS.value, model.config.n_layers)
    sparse = [LeMoConfig(keep_ratio=_SPARSE_KEEP.value, selector="attention_ratio", mlp_mode="dense",
                         keep_first_block=True, block_size=block)]
    sets = {"english": heldout.english_windows(tokenizer, seq_len, _WINDOWS.value)}
    if not _SMOKE.value:  # the byte-level smoke model has no Shakespeare split worth probing
        sets["shakespeare"] = split_windows(tokenizer, "validation", seq_len, _WINDOWS.value, 0)
    rows, summary = [], {}
    for set_name, set_windows in sets.items():
        data = ls.collect(model, set_windows, layers, "attention_ratio", sparse=sparse,
                          block_size=block)
        variants = [(w, heads, norm) for norm, heads, w
                    in itertools.product(_OUTPUT_NORMS.value, subsets, windows)]
        for (w, heads, norm), metrics in agreements(model, data, layers, variants, block,
                                                    seq_len).items():
            label = f"{'all' if w is None else w}@{'all' if heads is None else '+'.join(map(str, heads))}"
            if norm != "exact":
                label += f"@{norm}"
            rows.append({"kind": "agreement", "set": set_name, "window_blocks": w, "heads": heads,
                         "output_norm": norm, **metrics})
            summary[f"spearman_{set_name}@{label}"] = metrics["spearman"]
            print(f"{set_name:>11} window {label:>10}: " + " ".join(
                f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({time.perf_counter() - t0:.0f}s)",
                flush=True)
    write_result(_OUT.value, "lemo_window_agreement", rows, summary, png=False,
                 settings={"model": name, "windows": _WINDOWS.value, "seq_len": seq_len,
                           "block_size": block, "layers": list(layers),
                           "sparse_keep": _SPARSE_KEEP.value,
                           "window": "the row's first block + the query's own block + "
                                     "window_blocks blocks before it, causal"})
    print(f"wrote {_OUT.value} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    _checks.run(main)
