"""LeMo's premise measured on a real pretrained model: how sparse, and how contextual, is attention?

    python -m experiments.analyze_sparsity --out bench_results/analyze_sparsity.json \\
        [--model=smollm2-135m --seq_lens=1024,2048,4096,8192 --windows=2,3,1,1 --rows=256]

Windows of T tokens come from the held-out Shakespeare works (validation + test splits, each window
from the middle of a different work where possible), tokenised with the model's own tokenizer. For
every layer of every window the dense forward is run once and, from that layer's input:

- ``block_sparsity``: the fraction of 64-token key blocks whose oracle block score
  (:func:`tokensparse.lemo.scoring.block_scores`, the library's default target kernel on pre-RoPE
  q, k) is below ``block_threshold`` (10%) of the layer's largest block score;
  ``block_min_over_max`` is the smallest block score over the largest.
- ``score_sparsity`` (the paper's sparsity ratio): the fraction of causal attention entries below
  ``score_threshold`` (0.3) times their row's maximum, where an entry is LeMo's informativeness
  ``A_ij = sum_h ReLU(q_ih . k_jh)`` (pre-RoPE, as the oracle). ``softmax_sparsity`` is the same
  fraction over the softmax probabilities (post-RoPE, 1/sqrt(d), per head), which is far higher
  because softmax is peaked. ``score_sparsity_nosink`` leaves key 0 (the attention sink, which
  dominates many rows) out of both the maximum and the count. All are estimated on ``--rows`` query
  rows spread evenly over the window (entry-weighted, so they estimate the whole causal matrix).
- the top-40% block set (``keep``); ``cross_input_jaccard`` is its mean pairwise Jaccard overlap
  between different windows at the same layer, ``adjacent_layer_jaccard`` between layers l and l+1 of
  the same window. Two random 40% subsets overlap by ``random_jaccard`` (about 0.25) on average.

Writes the JSON (per-layer ``rows`` and a ``summary`` with ``block_sparsity@<T>``,
``score_sparsity@<T>``, ``softmax_sparsity@<T>``, ``cross_input_jaccard@<T>``,
``adjacent_layer_jaccard@<T>``) and, when matplotlib is installed (``pip install
tokensparse[plots]``), a PNG of the per-layer curves next to it.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jaxtyping import Array, Float

from experiments.bench import write_result
from tokensparse import data, zoo
from tokensparse.lemo import scoring
from tokensparse.lemo.model import pre_rope_qk
from tokensparse.llama import default_positions

_OUT = flags.DEFINE_string("out", "bench_results/analyze_sparsity.json", "Where to write the JSON.")
_PNG = flags.DEFINE_string("png", None, "Where to write the plots (default: --out with .png).")
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A tokensparse.zoo model name.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192"], "Window lengths T.")
_WINDOWS = flags.DEFINE_list("windows", ["2", "3", "1", "1"], "Windows per length (same order).")
_ROWS = flags.DEFINE_integer("rows", 256, "Query rows sampled per window for the score sparsities.")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend of the forward.")

BLOCK = 64
KEEP = 0.4
BLOCK_THRESHOLD = 0.1
SCORE_THRESHOLD = 0.3
STAT_KEYS = ("block_sparsity", "block_min_over_max", "score_sparsity", "score_sparsity_nosink",
             "softmax_sparsity")


def sample_rows(seq_len: int, n: int) -> np.ndarray:
    """``n`` query rows spread evenly over ``[0, seq_len)`` (all rows when ``n >= seq_len``)."""
    if n >= seq_len:
        return np.arange(seq_len, dtype=np.int32)
    return np.unique(np.round(np.linspace(0, seq_len - 1, n)).astype(np.int32))


def row_sparsity(values: Float[Array, "... r t"], rows: Array, threshold: float,
                 first_key: int = 0) -> Array:
    """Fraction of causal entries (key j <= query row) below ``threshold`` x their row's maximum,
    weighted by entries; ``values[..., i, :]`` belongs to query position ``rows[i]``. Keys before
    ``first_key`` are left out (``first_key=1`` ignores the attention sink at token 0)."""
    keys = jnp.arange(values.shape[-1])[None, :]
    causal = (keys <= rows[:, None]) & (keys >= first_key)
    causal = jnp.broadcast_to(causal, values.shape)
    top = jnp.max(jnp.where(causal, values, -jnp.inf), axis=-1, keepdims=True)
    below = causal & (values < threshold * top)
    return jnp.sum(below) / jnp.sum(causal)


def informativeness_rows(q: Float[Array, "t h d"], k: Float[Array, "t hkv d"], rows) -> Array:
    """LeMo's ``A_ij = sum_h ReLU(q_ih . k_jh)`` for the query ``rows``: [r, t]."""
    groups = q.shape[1] // k.shape[1]
    qr = q[rows].reshape(len(rows), k.shape[1], groups, q.shape[2])
    logits = jnp.einsum("rkgd,tkd->kgrt", qr.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.sum(jnp.maximum(logits, 0.0), axis=(0, 1))


def softmax_rows(q: Float[Array, "t h d"], k: Float[Array, "t hkv d"], rows) -> Array:
    """Causal softmax attention probabilities of the query ``rows``, per head: [h, r, t]."""
    groups = q.shape[1] // k.shape[1]
    qr = q[rows].reshape(len(rows), k.shape[1], groups, q.shape[2])
    logits = jnp.einsum("rkgd,tkd->kgrt", qr.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits.reshape(q.shape[1], len(rows), k.shape[0]) / math.sqrt(q.shape[2])
    causal = jnp.arange(k.shape[0])[None, :] <= rows[:, None]
    return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)


def top_blocks(scores: Float[Array, " nb"], keep: float) -> Array:
    """Boolean mask of the top ``floor(keep * n_b)`` blocks (at least one)."""
    k = max(1, int(keep * scores.shape[0]))
    _, idx = jax.lax.top_k(scores, k)
    return jnp.zeros(scores.shape, bool).at[idx].set(True)


@nnx.jit
def layer_stats(block, h, positions, rows):
    """One layer on one window (batch 1): its statistics and the next residual stream."""
    u = block.input_norm(h)
    q, k = pre_rope_qk(block, u)
    scores = scoring.block_scores(q, k, scoring.ScoreOptions(block_size=BLOCK))[0]
    q_rot, k_rot, _ = block.attn.project_qkv(u, positions)
    informativeness = informativeness_rows(q[0], k[0], rows)
    stats = {
        "block_sparsity": jnp.mean(scores < BLOCK_THRESHOLD * jnp.max(scores)),
        "block_min_over_max": jnp.min(scores) / jnp.max(scores),
        "argmax_block": jnp.argmax(scores),
        "score_sparsity": row_sparsity(informativeness, rows, SCORE_THRESHOLD),
        "score_sparsity_nosink": row_sparsity(informativeness, rows, SCORE_THRESHOLD, first_key=1),
        "softmax_sparsity": row_sparsity(softmax_rows(q_rot[0], k_rot[0], rows), rows,
                                         SCORE_THRESHOLD),
        "top": top_blocks(scores, KEEP),
    }
    return stats, block(h, positions)


def window_stats(model, tokens: np.ndarray, n_rows: int) -> list[dict]:
    """Per-layer statistics of one window (``tokens`` [T])."""
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    positions = default_positions(tokens)
    rows = jnp.asarray(sample_rows(tokens.shape[1], n_rows))
    h = model.embed(tokens)
    out = []
    for block in model.layers:
        stats, h = layer_stats(block, h, positions, rows)
        out.append(jax.device_get(stats))
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def random_jaccard(n_blocks: int, keep: float = KEEP) -> float:
    """Expected Jaccard overlap of two independent uniformly random ``floor(keep n)``-subsets."""
    k = max(1, int(keep * n_blocks))
    inter = k * k / n_blocks
    return inter / (2 * k - inter)


def analyze(model, windows: dict[int, list[np.ndarray]], n_rows: int) -> tuple[list, dict]:
    """``(rows, summary)``: per (T, layer) rows averaged over windows, and the headline numbers."""
    rows, summary = [], {}
    for seq_len, toks in windows.items():
        per_window = [window_stats(model, t, n_rows) for t in toks]  # [W][L]
        n_layers = len(per_window[0])
        tops = np.asarray([[s["top"] for s in w] for w in per_window])  # [W, L, nb]
        for layer in range(n_layers):
            layer_stats_ = [w[layer] for w in per_window]
            pairs = list(itertools.combinations(range(len(toks)), 2))
            row = {"seq_len": seq_len, "layer": layer, "windows": len(toks)}
            for key in STAT_KEYS:
                row[key] = float(np.mean([s[key] for s in layer_stats_]))
            row["argmax_first_block"] = float(np.mean([s["argmax_block"] == 0 for s in layer_stats_]))
            row["cross_input_jaccard"] = (float(np.mean([jaccard(tops[a, layer], tops[b, layer])
                                                         for a, b in pairs])) if pairs else None)
            row["adjacent_layer_jaccard"] = (
                float(np.mean([jaccard(tops[w, layer], tops[w, layer + 1]) for w in range(len(toks))]))
                if layer + 1 < n_layers else None)
            rows.append(row)
        mine = [r for r in rows if r["seq_len"] == seq_len]
        for key in (*STAT_KEYS, "argmax_first_block", "cross_input_jaccard",
                    "adjacent_layer_jaccard"):
            values = [r[key] for r in mine if r[key] is not None]
            if values:
                summary[f"{key}@{seq_len}"] = float(np.mean(values))
        summary[f"random_jaccard@{seq_len}"] = random_jaccard(tops.shape[-1])
    return rows, summary


def held_out_windows(tokenizer, seq_lens: list[int], counts: list[int]) -> dict[int, list[np.ndarray]]:
    """``counts[i]`` windows of ``seq_lens[i]`` tokens from the held-out works, one work per window
    while they last, each from the middle of its work."""
    corpus = data.load_corpus("shakespeare")
    docs = sorted(corpus.validation + corpus.test, key=lambda d: d.name)
    encoded = {d.name: np.asarray(tokenizer.encode(d.text).ids, np.int32) for d in docs}
    windows = {}
    for seq_len, count in zip(seq_lens, counts, strict=True):
        long_enough = [n for n in sorted(encoded, key=lambda n: -len(encoded[n]))
                       if len(encoded[n]) >= seq_len]
        if not long_enough:
            raise ValueError(f"No held-out work has {seq_len} tokens.")
        chosen = []
        for i in range(count):
            doc = encoded[long_enough[i % len(long_enough)]]
            spare = len(doc) - seq_len
            # Repeated works (more windows than works) take windows from other offsets.
            start = (spare // 2 + (i // len(long_enough)) * seq_len) % (spare + 1)
            chosen.append(doc[start:start + seq_len])
        windows[seq_len] = chosen
    return windows


def plot(rows: list[dict], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = ("block_min_over_max", "score_sparsity", "score_sparsity_nosink", "softmax_sparsity",
            "cross_input_jaccard", "adjacent_layer_jaccard")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    axes = axes.ravel()
    for ax, key in zip(axes, keys, strict=True):
        for seq_len in sorted({r["seq_len"] for r in rows}):
            pts = [(r["layer"], r[key]) for r in rows if r["seq_len"] == seq_len and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=f"T={seq_len}")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv):
    del argv
    t0 = time.perf_counter()
    seq_lens = [int(s) for s in _SEQ_LENS.value]
    counts = [int(c) for c in _WINDOWS.value]
    if len(counts) != len(seq_lens):
        raise app.UsageError(f"--windows has {len(counts)} entries, --seq_lens {len(seq_lens)}.")
    model, config, tokenizer = zoo.load(_MODEL.value, attention_backend=_ATTENTION.value)
    if max(seq_lens) > config.max_positions:
        raise app.UsageError(f"--seq_lens exceeds the model's context ({config.max_positions}).")
    windows = held_out_windows(tokenizer, seq_lens, counts)
    rows, summary = analyze(model, windows, _ROWS.value)
    summary["seconds"] = time.perf_counter() - t0
    out = pathlib.Path(_OUT.value)
    settings = {"model": _MODEL.value, "seq_lens": seq_lens, "windows": counts, "rows": _ROWS.value,
                "block_size": BLOCK, "keep": KEEP, "block_threshold": BLOCK_THRESHOLD,
                "score_threshold": SCORE_THRESHOLD, "score_options": "target kernel, pre-RoPE",
                "corpus": "shakespeare validation+test", "attention": _ATTENTION.value}
    write_result(out, "analyze_sparsity", rows, summary, settings=settings)
    png = pathlib.Path(_PNG.value) if _PNG.value else out.with_suffix(".png")
    if plot(rows, png):
        print(f"wrote {png}")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4g}")


if __name__ == "__main__":
    app.run(main)
