"""experiments.analyze_sparsity: its statistics against dense numpy definitions, on a tiny model."""

import importlib.util
import itertools
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _env import subprocess_env
from flax import nnx

from tokensparse.config import preset
from tokensparse.lemo import analysis as A
from tokensparse.lemo import scoring
from tokensparse.llama import Llama

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dense_fraction(values: np.ndarray, threshold: float, first_key: int = 0) -> float:
    """Entry-weighted fraction of causal entries below threshold x row max, over all rows."""
    t = values.shape[-1]
    below = total = 0
    for i in range(t):
        row = values[..., i, first_key:i + 1]
        if row.shape[-1] == 0:
            continue
        below += int((row < threshold * row.max(-1, keepdims=True)).sum())
        total += row.size
    return below / total


def test_row_statistics_match_dense_numpy():
    rng = np.random.default_rng(0)
    t, h, hkv, d = 40, 4, 2, 8
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    rows = jnp.asarray(A.sample_rows(t, 1000))
    assert rows.shape == (t,)
    k_full = np.repeat(k, h // hkv, axis=1)
    logits = np.einsum("ihd,jhd->hij", q, k_full)
    informativeness = np.maximum(logits, 0).sum(0)
    got = A.informativeness_rows(jnp.asarray(q), jnp.asarray(k), rows)
    np.testing.assert_allclose(np.asarray(got), informativeness, rtol=1e-5, atol=1e-5)
    for first_key in (0, 1):
        np.testing.assert_allclose(float(A.row_sparsity(got, rows, 0.3, first_key)),
                                   _dense_fraction(informativeness, 0.3, first_key), atol=1e-6)
    z = np.where(np.tril(np.ones((t, t), bool)), logits / np.sqrt(d), -np.inf)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    got = np.asarray(A.softmax_rows(jnp.asarray(q), jnp.asarray(k), rows))
    np.testing.assert_allclose(got, probs, atol=1e-6)
    assert float(A.row_sparsity(jnp.asarray(probs), rows, 0.3)) == pytest.approx(
        _dense_fraction(probs, 0.3), abs=1e-6)


def test_sampled_rows_and_jaccard():
    rows = A.sample_rows(1024, 16)
    assert rows[0] == 0 and rows[-1] == 1023 and len(rows) == 16 and np.all(np.diff(rows) > 0)
    a, b = np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    assert A.jaccard(a, b) == pytest.approx(1 / 3) and A.jaccard(a, a) == 1.0
    rng = np.random.default_rng(0)
    n, keep = 32, 0.4
    k = int(keep * n)
    draws = []
    for _ in range(4000):
        x, y = np.zeros(n, bool), np.zeros(n, bool)
        x[rng.choice(n, k, replace=False)] = True
        y[rng.choice(n, k, replace=False)] = True
        draws.append(A.jaccard(x, y))
    assert A.random_jaccard(n, keep) == pytest.approx(np.mean(draws), abs=0.01)
    top = np.asarray(A.top_blocks(jnp.asarray([0.5, 3.0, 1.0, 2.0, 0.1]), 0.4))
    assert top.tolist() == [False, True, False, True, False]


def test_shard_overlap_counts_the_global_blocks_per_shard_selection_keeps():
    scores = jnp.asarray([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    assert float(A.shard_overlap(scores, 0.5, 1)) == 1.0
    assert float(A.shard_overlap(scores, 0.5, 2)) == 0.5  # {0, 1} + {4, 5} vs {0, 1, 2, 3}
    assert float(A.shard_overlap(scores, 0.5, 4)) == 0.5  # one per pair: {0, 2, 4, 6}


def test_analyze_on_a_tiny_model():
    config = preset("tiny")
    model = Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    windows = {384: [rng.integers(0, config.vocab_size, 384) for _ in range(3)],
               256: [rng.integers(0, config.vocab_size, 256)]}
    rows, summary = A.analyze(model, windows, n_rows=32)
    assert len(rows) == 2 * config.n_layers
    for row in rows:
        for key in A.STAT_KEYS:  # 6 or 4 blocks: the 4- and 8-shard overlaps are undefined at 384
            if key in row:
                assert 0.0 <= row[key] <= 1.0, (key, row)
        assert "shard_overlap_2" in row and ("shard_overlap_4" in row) == (row["seq_len"] == 256)
    short = [r for r in rows if r["seq_len"] == 384]
    assert all(r["cross_input_jaccard"] is not None for r in short)
    assert all(r["cross_input_jaccard"] is None for r in rows if r["seq_len"] == 256)
    assert short[-1]["adjacent_layer_jaccard"] is None
    assert {"block_sparsity@384", "score_sparsity@256", "cross_input_jaccard@384",
            "random_jaccard@256"} <= set(summary)
    # Layer 0's block statistics, recomputed densely from the embedding output.
    tokens = jnp.asarray(windows[384][0], jnp.int32)[None]
    block = model.layers[0]
    u = block.input_norm(model.embed(tokens))
    q = block.attn.q_proj(u).reshape(1, 384, config.n_heads, config.head_dim)
    k = block.attn.k_proj(u).reshape(1, 384, config.n_kv_heads, config.head_dim)
    scores = np.asarray(scoring.column_scores(scoring.block_scores_reference(q, k)))[0]
    stats = A.window_stats(model, windows[384][0], 32)[0]
    assert float(stats["block_sparsity"]) == pytest.approx(np.mean(scores < 0.1 * scores.max()))
    assert float(stats["block_min_over_max"]) == pytest.approx(scores.min() / scores.max(), rel=1e-5)
    assert len(scores) == 6 and np.asarray(stats["top"]).sum() == 2
    assert set(np.flatnonzero(stats["top"])) == set(np.argsort(-scores)[:2])
    tops = [np.asarray(w[0]["top"]) for w in (A.window_stats(model, x, 32) for x in windows[384])]
    expected = np.mean([A.jaccard(tops[a], tops[b]) for a, b in itertools.combinations(range(3), 2)])
    assert short[0]["cross_input_jaccard"] == pytest.approx(expected)
    assert short[0]["keep_blocks"] == [np.flatnonzero(t).tolist() for t in tops]


@pytest.mark.slow
def test_cli_smoke(tmp_path):
    """The entry point on SmolLM2 (zoo cache) and held-out Shakespeare, two short windows."""
    out = tmp_path / "sparsity.json"
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-m", "experiments.analyze_sparsity", f"--out={out}",
                           "--seq_lens=128", "--windows=2", "--rows=16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "analyze_sparsity" and len(result["rows"]) == 30
    assert 0 <= result["summary"]["block_sparsity@128"] <= 1
    assert 0 <= result["summary"]["cross_input_jaccard@128"] <= 1
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (extra "plots")
        assert out.with_suffix(".png").stat().st_size > 1000
