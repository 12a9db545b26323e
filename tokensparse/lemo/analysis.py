"""Contextual sparsity statistics of a pretrained model's attention (LeMo's premise).

Pure functions behind ``python -m experiments.analyze_sparsity``: per layer, the fraction of 64-token
blocks whose oracle block score is below 10% of the layer maximum, the fraction of LeMo
informativeness scores (and of softmax probabilities) below 0.3x the row maximum, and the Jaccard
overlap of the top-40% block sets across inputs and adjacent layers.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from tokensparse import data, routing
from tokensparse.lemo import scoring
from tokensparse.lemo.rules import pre_rope_qk
from tokensparse.llama import default_positions

BLOCK = 64
KEEP = 0.4
BLOCK_THRESHOLD = 0.1
SCORE_THRESHOLD = 0.3
SHARDS = (2, 4, 8)
STAT_KEYS = ("block_sparsity", "block_min_over_max", "score_sparsity", "score_sparsity_nosink",
             "softmax_sparsity", *(f"shard_overlap_{s}" for s in SHARDS))


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


def shard_overlap(scores: Float[Array, " nb"], keep: float, shards: int) -> Array:
    """Fraction of the global top ``floor(keep · n_b)`` blocks that per-shard selection (each of
    ``shards`` contiguous pieces keeps its own top ``ceil(k / shards)``) also keeps."""
    k = max(1, int(keep * scores.shape[0]))
    local = routing.topk_select(scores[None], k, shards=shards).indices[0]
    return jnp.sum(top_blocks(scores, keep)[local]) / k


def top_blocks(scores: Float[Array, " nb"], keep: float) -> Array:
    """Boolean mask of the top ``floor(keep * n_b)`` blocks (at least one)."""
    k = max(1, int(keep * scores.shape[0]))
    _, idx = jax.lax.top_k(scores, k)
    return jnp.zeros(scores.shape, bool).at[idx].set(True)


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
        **{f"shard_overlap_{s}": shard_overlap(scores, KEEP, s) for s in SHARDS
           if scores.shape[0] % s == 0},
    }
    return stats, block(h, positions)


def window_stats(model, tokens: np.ndarray, n_rows: int) -> list[dict]:
    """Per-layer statistics of one window (``tokens`` [T])."""
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    rows = jnp.asarray(sample_rows(tokens.shape[1], n_rows))
    return jax.device_get(_all_layer_stats(model, tokens, rows))


@nnx.jit
def _all_layer_stats(model, tokens, rows):
    def layer_fn(block, h, layer, _):
        stats, h = layer_stats(block, h, layer.positions, rows)
        return h, stats

    _, outputs = model.run_layers(model.embed(tokens), default_positions(tokens), layer_fn=layer_fn)
    return outputs


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def random_jaccard(n_blocks: int, keep: float = KEEP) -> float:
    """Expected Jaccard overlap of two independent uniformly random ``floor(keep n)``-subsets."""
    k = max(1, int(keep * n_blocks))
    inter = k * k / n_blocks
    return inter / (2 * k - inter)


def analyze(model, windows: dict[int, list[np.ndarray]], n_rows: int) -> tuple[list, dict]:
    """``(rows, summary)``: per (T, layer) rows averaged over windows (plus ``keep_blocks``, each
    window's top-40% block indices, for drawing the keep pattern), and the headline numbers."""
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
                if key in layer_stats_[0]:
                    row[key] = float(np.mean([s[key] for s in layer_stats_]))
            row["argmax_first_block"] = float(np.mean([s["argmax_block"] == 0 for s in layer_stats_]))
            row["cross_input_jaccard"] = (float(np.mean([jaccard(tops[a, layer], tops[b, layer])
                                                         for a, b in pairs])) if pairs else None)
            row["adjacent_layer_jaccard"] = (
                float(np.mean([jaccard(tops[w, layer], tops[w, layer + 1]) for w in range(len(toks))]))
                if layer + 1 < n_layers else None)
            row["keep_blocks"] = [np.flatnonzero(tops[w, layer]).tolist() for w in range(len(toks))]
            rows.append(row)
        mine = [r for r in rows if r["seq_len"] == seq_len]
        for key in (*STAT_KEYS, "argmax_first_block", "cross_input_jaccard",
                    "adjacent_layer_jaccard"):
            values = [r[key] for r in mine if r.get(key) is not None]
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
