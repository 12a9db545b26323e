"""LeMo's selection rules (tokensparse.lemo.rules): shapes, determinism, padding, and each rule
against a dense numpy reference; the registry and the config's score flags."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse.config import LeMoConfig, lemo_selectors, preset
from tokensparse.layer_loop import Layer
from tokensparse.lemo import forward as lemo_forward
from tokensparse.lemo import rules, scoring
from tokensparse.lemo import selection as lemo_selection
from tokensparse.lemo.profiles import named
from tokensparse.llama import Llama
from tokensparse.rope import apply_rope, inverse_frequencies

CONFIG = preset("tiny").replace(n_layers=2)
B, T, BLOCK = 2, 64, 8
NB = T // BLOCK
BUILTIN = ("oracle", "random", "attention_ratio", "attention_mass", "recent", "ratio_mass")
LEMO = spec_lemo(block_size=BLOCK)


@pytest.fixture(scope="module")
def block():
    return Llama(CONFIG, rngs=nnx.Rngs(0)).layers[1]


def _h(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, CONFIG.d_model))


def _layer(segment_ids=None, index=1, positions=None):
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions
    return Layer(jnp.int32(index), positions, segment_ids, None, None)


def _scores(block, name, h, layer, lemo=LEMO):
    fn = rules.get(name).scorer(None, lemo)
    return np.asarray(nnx.jit(lambda b, h: rules.layer_scores(fn, b, h, layer, lemo))(block, h))


# ----------------------------------------------------------------------------- numpy references


def _np(x):
    return np.asarray(x, np.float64)


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _reference_attention(block, h, segment_ids=None):
    """Per row: normed input, rotated q, k (via rope.apply_rope), v, causal softmax P [H, T, T],
    attention output after o_proj. Everything but RoPE in numpy float64."""
    a = block.attn
    u = _rms(_np(h), _np(block.input_norm.scale[...]), CONFIG.rms_eps)
    q = (u @ _np(a.q_proj.kernel[...])).reshape(B, T, a.n_heads, a.head_dim)
    k = (u @ _np(a.k_proj.kernel[...])).reshape(B, T, a.n_kv_heads, a.head_dim)
    v = (u @ _np(a.v_proj.kernel[...])).reshape(B, T, a.n_kv_heads, a.head_dim)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    inv = inverse_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
    qr = _np(apply_rope(jnp.asarray(q, jnp.float32), pos, inv))
    kr = _np(apply_rope(jnp.asarray(k, jnp.float32), pos, inv))
    groups = a.n_heads // a.n_kv_heads
    kr, v = np.repeat(kr, groups, axis=2), np.repeat(v, groups, axis=2)
    seg = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    logits = np.einsum("bihd,bjhd->bhij", qr, kr) / math.sqrt(a.head_dim)
    mask = (np.arange(T)[None, :] <= np.arange(T)[:, None])[None] & (
        seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    logits = np.where(mask[:, None], logits, -np.inf)
    top = np.max(logits, -1, keepdims=True)
    e = np.where(mask[:, None], np.exp(logits - np.where(np.isfinite(top), top, 0)), 0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("bhij,bjhd->bihd", p, v).reshape(B, T, -1) @ _np(a.o_proj.kernel[...])
    return u, q, k, qr, p, out


def _block_mean(x):
    return x.reshape(B, NB, BLOCK).mean(-1)


def _block_sum(x):
    return x.reshape(B, NB, BLOCK).sum(-1)


def _reference_ratio(block, h):
    out = _reference_attention(block, h)[-1]
    return np.linalg.norm(out, axis=-1) / np.linalg.norm(_np(h), axis=-1)


def _reference_mass(block, h, weights=None):
    p = _reference_attention(block, h)[4]
    w = np.ones((B, T)) if weights is None else weights
    return np.einsum("bhij,bi->bj", p, w) / p.shape[1]


def test_attention_ratio_matches_numpy(block):
    h = _h(1)
    np.testing.assert_allclose(_scores(block, "attention_ratio", h, _layer()),
                               _block_mean(_reference_ratio(block, h)), rtol=2e-4)


def test_attention_mass_matches_numpy(block):
    h = _h(2)
    got = _scores(block, "attention_mass", h, _layer())
    want = _block_sum(_reference_mass(block, h))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    np.testing.assert_allclose(got.sum(-1), T, rtol=1e-4)  # every query row's mass sums to 1


def test_ratio_mass_matches_numpy(block):
    h = _h(3)
    ratio = _reference_ratio(block, h)
    r, m = _block_mean(ratio), _block_sum(_reference_mass(block, h, ratio))
    want = r / r.mean(-1, keepdims=True) + rules.RATIO_MASS_WEIGHT * m / m.mean(-1, keepdims=True)
    np.testing.assert_allclose(_scores(block, "ratio_mass", h, _layer()), want, rtol=5e-4)


@pytest.mark.parametrize("post_rope", [False, True])
def test_oracle_rule_scores_pre_or_post_rope_q_k(block, post_rope):
    h = _h(4)
    _, q, k, qr, _, _ = _reference_attention(block, h)
    lemo = LEMO.replace(score_post_rope=post_rope)
    got = _scores(block, "oracle", h, _layer(), lemo)
    qq, kk = (qr, _np(apply_rope(jnp.asarray(k, jnp.float32), _layer().positions,
                                 inverse_frequencies(CONFIG.head_dim, CONFIG.rope_theta,
                                                     CONFIG.rope_scaling)))) if post_rope else (q, k)
    want = scoring.column_scores(scoring.block_scores_reference(
        jnp.asarray(qq, jnp.float32), jnp.asarray(kk, jnp.float32), ScoreOptions(block_size=BLOCK)))
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-4)


ScoreOptions = scoring.ScoreOptions


def test_post_rope_changes_the_oracle_scores(block):
    h = _h(5)
    pre = _scores(block, "oracle", h, _layer())
    post = _scores(block, "oracle", h, _layer(), LEMO.replace(score_post_rope=True))
    assert np.max(np.abs(pre - post)) > 1e-3


def test_score_flags_reach_the_oracle(block):
    h = _h(6)
    base = _scores(block, "oracle", h, _layer())
    for flag in ("score_causal", "score_divide_by_heads", "score_exclude_diagonal",
                 "score_scale_by_sqrt_d"):
        lemo = LEMO.replace(**{flag: True})
        opts = ScoreOptions.from_lemo(lemo)
        assert getattr(opts, flag.removeprefix("score_"))
        u = block.input_norm(h)
        want = scoring.column_scores(scoring.block_scores_reference(
            *rules.pre_rope_qk(block, u), opts))
        got = _scores(block, "oracle", h, _layer(), lemo)
        np.testing.assert_allclose(got, np.asarray(want), rtol=2e-4)
        if flag != "score_exclude_diagonal":  # (a tile's max is rarely on its diagonal)
            assert np.max(np.abs(got - base)) > 1e-6, flag


def test_recent_prefers_the_latest_blocks(block):
    scores = _scores(block, "recent", _h(), _layer())
    np.testing.assert_array_equal(scores, np.broadcast_to(np.arange(NB), (B, NB)))
    sel = lemo_selection.select_top(jnp.asarray(scores), 0.5, LEMO)
    assert np.unique(np.asarray(sel.indices[0]) // BLOCK).tolist() == list(range(NB // 2, NB))


def test_random_is_seeded_by_layer_and_positions(block):
    h = _h()
    a = _scores(block, "random", h, _layer(index=1))
    np.testing.assert_array_equal(a, _scores(block, "random", _h(9), _layer(index=1)))
    assert not np.array_equal(a, _scores(block, "random", h, _layer(index=2)))
    shifted = jnp.broadcast_to(jnp.arange(T) + 64, (B, T))
    assert not np.array_equal(a, _scores(block, "random", h, _layer(positions=shifted)))
    assert np.all((a >= 0) & (a < 1)) and not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("name", BUILTIN)
def test_rule_shapes_determinism_and_padding(block, name):
    h = _h(7)
    scores = _scores(block, name, h, _layer())
    assert scores.shape == (B, NB) and np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores, _scores(block, name, h, _layer()))
    # The last two blocks of row 1 are padding: they score -inf and are never chosen.
    seg = jnp.zeros((B, T), jnp.int32).at[1, T - 2 * BLOCK:].set(-1)
    padded = _scores(block, name, h, _layer(seg))
    assert np.all(np.isneginf(padded[1, -2:])) and np.all(np.isfinite(padded[1, :-2]))
    assert np.all(np.isfinite(padded[0]))
    sel = lemo_selection.select_top(jnp.asarray(padded), 0.75, LEMO)
    kept = np.asarray(sel.indices[1])[np.asarray(sel.valid[1])]
    assert kept.size and np.all(kept < T - 2 * BLOCK)


def test_padding_tokens_do_not_change_the_scores_of_real_blocks(block):
    """A row's padded tail (its own segment id −1) changes nothing for the real blocks of
    attention_ratio (their tokens never see padding)."""
    h = _h(8)
    seg = jnp.zeros((B, T), jnp.int32).at[:, T - BLOCK:].set(-1)
    a = _scores(block, "attention_ratio", h, _layer(seg))
    b = _scores(block, "attention_ratio", h.at[:, T - BLOCK:].add(5.0), _layer(seg))
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5)


def test_keep_first_block_forces_block_zero():
    scores = jnp.asarray(np.tile(np.arange(NB, dtype=np.float32), (B, 1)))  # block 0 the worst
    without = lemo_selection.select_top(scores, 0.25, LEMO)
    with_first = lemo_selection.select_top(scores, 0.25, LEMO.replace(keep_first_block=True))
    k = int(0.25 * NB)
    assert np.unique(np.asarray(without.indices[0]) // BLOCK).tolist() == list(range(NB - k, NB))
    assert np.unique(np.asarray(with_first.indices[0]) // BLOCK).tolist() == [
        0, *range(NB - k + 1, NB)]


def test_selection_is_counted_under_its_named_scope(block):
    fn = rules.get("attention_ratio").scorer(None, LEMO)
    lowered = jax.jit(lambda s, h: rules.layer_scores(
        fn, nnx.merge(*nnx.split(block)[:1], s), h, _layer(), LEMO)).lower(
        nnx.split(block)[1], _h())
    assert rules.SCOPE in lowered.as_text(debug_info=True)


def test_registry_extends_the_config_and_the_router():
    with pytest.raises(ValueError, match="selector"):
        LeMoConfig(selector="no_such_rule")
    with pytest.raises(ValueError, match="unknown selection rule"):
        rules.get("no_such_rule")

    def first_blocks(block, h, layer, lemo):  # prefers early blocks
        nb = h.shape[1] // lemo.block_size
        return jnp.broadcast_to(-jnp.arange(nb, dtype=jnp.float32), (h.shape[0], nb))

    rules.register("test_first_blocks", first_blocks, replace=True)
    assert "test_first_blocks" in lemo_selectors()
    lemo = LeMoConfig(block_size=BLOCK, selector="test_first_blocks", keep_ratio=0.5,
                      schedule="all")
    with pytest.raises(ValueError, match="already registered"):
        rules.register("test_first_blocks", first_blocks)
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    route = lemo_selection.lemo_router(model, lemo)
    kind = lemo_selection.LayerKind(0.5)
    layer = Layer(jnp.int32(0), _layer().positions, None, None, kind)
    sel = route(model.layers[0], _h(), layer)
    assert np.unique(np.asarray(sel.indices) // BLOCK).tolist() == list(range(NB // 2))


def test_every_builtin_rule_runs_in_the_sparse_forward():
    import tokensparse.lemo as lemo_api

    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, CONFIG.vocab_size)
    loss = nnx.jit(lambda m, t, lemo: lemo_api.sparse_forward_loss(m, t, lemo), static_argnums=2)
    values = {name: float(loss(model, tokens, LEMO.replace(selector=name, keep_ratio=0.5,
                                                             schedule="all")))
              for name in BUILTIN}
    dense = float(loss(model, tokens, LEMO.replace(keep_ratio=1.0, schedule="all")))
    assert all(np.isfinite(v) and v != dense for v in values.values()), (values, dense)


def test_score_options_from_the_config_and_into_target_caches(tmp_path):
    import json

    from tokensparse.lemo import targets

    lemo = spec_lemo(block_size=BLOCK, score_causal=True, score_post_rope=True)
    opts = ScoreOptions.from_lemo(lemo)
    assert (opts.block_size, opts.causal, opts.post_rope) == (BLOCK, True, True)
    assert not (opts.divide_by_heads or opts.scale_by_sqrt_d or opts.exclude_diagonal)

    class Windows:
        def batch(self, i):
            return type("W", (), {"tokens": np.zeros((1, T), np.int32)})()

    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    cache = targets.TargetCache(model, Windows(), (0,), BLOCK, directory=tmp_path, options=opts)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["score_options"]["post_rope"] and manifest["score_options"]["causal"]
    x, tiles = cache(0)["0"]
    u = model.layers[0].input_norm(jnp.asarray(model.embed(jnp.zeros((1, T), jnp.int32))))
    want = scoring.block_tiles(*rules.scoring_qk(model.layers[0], u, _layer().positions[:1],
                                                 opts), opts)
    np.testing.assert_allclose(tiles, np.asarray(want), rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        targets.TargetCache(model, Windows(), (0,), 2 * BLOCK, options=opts)


def test_named_llama2_profile_follows_the_spec_anchors():
    p = np.asarray(named("llama2-7b-artifact"))
    eliminated = 1 - p
    assert p.shape == (32,)
    np.testing.assert_allclose(eliminated[[0, 6, 10, 14, 18, 31]], [0.01, 0.14, 0.29, 0.39, 0.50,
                                                                     0.51], atol=1e-6)
    assert np.all((eliminated[19:31] >= 0.55) & (eliminated[19:31] <= 0.60))
    assert abs(eliminated.mean() - 0.382) < 5e-4
    lemo = spec_lemo(schedule="profile", profile=tuple(p))
    assert lemo.keep_ratios(32) == tuple(p)
    with pytest.raises(ValueError, match="unknown profile"):
        named("opt-nonexistent")


@pytest.mark.slow
def test_selection_benchmark_shortcuts_equal_the_sparse_forward():
    """experiments.bench.lemo_selection runs the dense layers once and each rule from the first
    sparse layer's input, compiled once for every keep ratio (the masked reference): both equal
    tokensparse.lemo.sparse_forward_loss, per row."""
    import tokensparse.lemo as lemo_api
    from experiments.bench import selection_losses as bench
    from tokensparse import routing

    config = preset("tiny").replace(n_layers=4)
    model = Llama(config, rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    for name, eliminated in (("attention_ratio", "sink_local"), ("oracle", "pass")):
        lemo = LeMoConfig(block_size=BLOCK, keep_ratio=0.5, selector=name, keep_first_block=True,
                          mlp_mode="dense", eliminated=eliminated)
        start = bench.first_sparse(lemo, config.n_layers)
        assert start == 1
        hidden = bench.prefix(model, tokens, start)
        compacted = np.asarray(bench.row_losses(model, hidden, tokens, lemo, start))
        k = routing.capacity(NB, 0.5, rounding="floor")
        masked = np.asarray(bench.masked_row_losses(model, hidden, tokens, lemo.replace(
            keep_ratio=0.3), start, jnp.int32(k)))
        whole = [float(lemo_api.sparse_forward_loss(model, tokens[i:i + 1], lemo)) for i in range(B)]
        np.testing.assert_allclose(compacted, whole, rtol=1e-5)
        np.testing.assert_allclose(masked, whole, rtol=1e-5)
    dense = np.asarray(bench.masked_row_losses(model, hidden, tokens, lemo, start, jnp.int32(NB)))
    want = [float(lemo_api.sparse_forward_loss(model, tokens[i:i + 1], lemo.replace(
        keep_ratio=1.0))) for i in range(B)]
    np.testing.assert_allclose(dense, want, rtol=1e-5)


@pytest.mark.slow
def test_selection_benchmark_smoke(tmp_path):
    """The benchmark end to end on a tiny random model: rows, summary keys, the merge of pieces."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sel.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.lemo_selection", "--smoke",
                    "--seq_lens=128", "--keeps=0.5", "--rules=oracle,random", f"--out={out}"],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds.count("loss") == 2 and kinds.count("dense") == 1
    assert kinds.count("sensitivity") == 2 and kinds.count("flops") == 2
    summary = result["summary"]
    assert {"best_english@0.5@128", "beats_random_everywhere_oracle", "sensitivity_layers_oracle",
            "selection_flops_share_oracle"} <= set(summary)
    assert summary["selection_flops_share_random"] == 0.0 < summary["selection_flops_share_oracle"]
    loss = next(r for r in result["rows"] if r["kind"] == "loss")
    assert loss["lemo"]["selector"] == "oracle" and "score_post_rope" in loss["lemo"]
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.lemo_selection",
                    f"--merge={out},{out}", f"--out={merged}"], check=True, capture_output=True)
    assert len(json.loads(merged.read_text())["rows"]) == 2 * len(result["rows"])
    # By default every rule runs, the library's default (learned) first.
    every = tmp_path / "every.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.lemo_selection", "--smoke", "--seq_lens=128",
                    "--keeps=0.5", "--nosensitivity", "--noflops", f"--out={every}"],
                   check=True, capture_output=True)
    rules_run = [r["rule"] for r in json.loads(every.read_text())["rows"] if r["kind"] == "loss"]
    assert rules_run[0] == LeMoConfig().selector == "learned"
    assert set(rules_run) == {"learned", "oracle", "random", "attention_ratio", "attention_mass", "recent",
                              "ratio_mass"}


def test_the_default_is_the_learned_rule_with_the_first_block_kept():
    """LeMo's defaults select with the cheap learned rule and keep the attention sink; a model
    without learned-selector weights is refused with the command that trains them."""
    default = LeMoConfig()
    assert (default.selector, default.keep_first_block) == ("learned", True)
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, T), jnp.int32)
    with pytest.raises(ValueError, match=r"python -m experiments\.train_selector"):
        lemo_forward.sparse_forward_loss(model, tokens, LeMoConfig(block_size=BLOCK))
    # No sparse layer, nothing to select: no weights needed.
    everything = LeMoConfig(block_size=BLOCK, keep_ratio=1.0, schedule="all")
    assert np.isfinite(float(lemo_forward.sparse_forward_loss(model, tokens, everything)))
