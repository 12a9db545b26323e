"""SUBLLM structure parsing, positions and masks across levels, and the model forward."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import flops, routing
from tokensparse.config import preset
from tokensparse.data import Batch
from tokensparse.llama import Llama
from tokensparse.subllm.model import SubLLM, hidden_fn
from tokensparse.subllm.structure import SubLLMConfig, dense_twin, parse_structure, subllm_preset
from tokensparse.train import lm_loss

S24 = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"
N = 32  # every forward uses [2, N] tokens so the jitted forward compiles once per config


def _config(**changes):
    """subllm-tiny cut to 4 layers (levels 0, 1, 2, 1): compile time dominates these tests."""
    base = subllm_preset("subllm-tiny")
    return base.replace(model=base.model.replace(n_layers=4), structure="T(T(T)T)", **changes)


def _tokens(key, shape=(2, N), vocab=256):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@functools.partial(nnx.jit, static_argnames=("mode", "unit"))
def _jit_forward(model, tokens, positions, segment_ids, key, *, mode, unit):
    h, aux = model.forward(tokens, positions, segment_ids, mode=mode, rng=key, force_unit_weights=unit)
    return model.head(h), aux


def _forward(model, tokens, positions=None, segment_ids=None, key=None, *, mode, unit=False):
    """Jitted (logits, aux); defaults filled outside jit so calls share one compilation."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.zeros(tokens.shape, jnp.int32)
    key = jax.random.key(0) if key is None else key
    return _jit_forward(model, tokens, positions, segment_ids, key, mode=mode, unit=unit)


def _n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def tiny():
    return SubLLM(_config(), rngs=nnx.Rngs(0))


# --- parsing -------------------------------------------------------------------------------------


def test_parse_24_layer_structure():
    s = parse_structure(S24)
    assert s.n_layers == 24
    assert s.levels == (0,) * 5 + (1,) * 5 + (2,) * 4 + (1,) * 5 + (0,) * 5
    assert s.n_subsamplers == 2 and s.depth == 2
    kinds = [op.kind for op in s.ops]
    assert kinds.count("down") == 2 and kinds.count("up") == 2
    downs = [op for op in s.ops if op.kind == "down"]
    assert [(op.index, op.level, op.keep) for op in downs] == [(0, 1, 0.64), (1, 2, 0.64)]
    ups = [op for op in s.ops if op.kind == "up"]
    assert [(op.index, op.level) for op in ups] == [(1, 1), (0, 0)]  # inner closes first


def test_parse_per_level_ratios_and_dense():
    assert parse_structure(S24, keep=[0.5, 0.8]).keep == (0.5, 0.8)
    dense = parse_structure("T" * 6)
    assert dense.n_subsamplers == 0 and dense.levels == (0,) * 6
    siblings = parse_structure("T(T)T(T)T")
    assert siblings.n_subsamplers == 2 and siblings.depth == 1


@pytest.mark.parametrize("bad, match", [
    ("TT(T", "unclosed"), ("T)T(", "unmatched"), ("T(T))", "unmatched"), ("T()T", "empty"),
    ("TxT", "only"), ("", "non-empty"), ("()", "empty"),
])
def test_parse_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_structure(bad)


@pytest.mark.parametrize("keep", [[0.64], [0.5, 0.5, 0.5], [0.0, 0.5], [0.5, 1.5], 0.0, -0.1, 1.01])
def test_parse_bad_ratios(keep):
    with pytest.raises(ValueError, match="keep"):
        parse_structure(S24, keep=keep)


def test_config_validation():
    cfg = subllm_preset("subllm-tiny")
    with pytest.raises(ValueError, match="layers"):
        cfg.replace(structure="T(T)T")
    with pytest.raises(ValueError, match="level_positions"):
        cfg.replace(level_positions="absolute")
    with pytest.raises(ValueError, match="infer_capacity"):
        cfg.replace(infer_capacity=0.0)
    with pytest.raises(ValueError, match="balancer_statistic"):
        cfg.replace(balancer_statistic="median")
    with pytest.raises(ValueError, match="bypass_init"):
        cfg.replace(bypass_init=0.0)
    for margin in (-0.01, 0.5):
        with pytest.raises(ValueError, match="balancer_margin"):
            cfg.replace(balancer_margin=margin)
    for scale in (0.0, 11.0):
        with pytest.raises(ValueError, match="balancer_start_scale"):
            cfg.replace(balancer_start_scale=scale)
    for steps in (-1, 2.5):
        with pytest.raises(ValueError, match="balancer_start_steps"):
            cfg.replace(balancer_start_steps=steps)
    assert dense_twin(cfg).structure == "TTTTTT"
    assert subllm_preset("subllm-small").parsed.levels == (0,) * 3 + (1,) * 2 + (2,) * 2 + (1,) * 2 + (0,) * 3


def test_param_difference_1p3b_is_8192():
    cfg = subllm_preset("subllm-1.3b")
    sub = nnx.eval_shape(lambda: SubLLM(cfg, rngs=nnx.Rngs(0)))
    dense = nnx.eval_shape(lambda: SubLLM(dense_twin(cfg), rngs=nnx.Rngs(0)))
    d = cfg.model.d_model
    assert _n_params(sub) - _n_params(dense) == 2 * d + 2 * d == 8192
    assert _n_params(dense) == cfg.model.num_params() == 1_345_423_360


# --- forward -------------------------------------------------------------------------------------


def test_dense_reduction():
    """keep=1, unit weights, c=1 (``bypass_init``): SUBLLM equals the dense Llama with the same weights."""
    cfg = _config(keep=1.0, bypass_init=1.0)
    sub = SubLLM(cfg, rngs=nnx.Rngs(0))
    dense = Llama(cfg.model, rngs=nnx.Rngs(1))
    for name in ("embed", "final_norm", "lm_head"):
        nnx.update(getattr(dense, name), nnx.state(getattr(sub, name)))
    with dense.layers.editing() as layers:  # layers are stored stacked: edit per-layer views
        for block_d, block_s in zip(layers, sub.layers, strict=True):
            nnx.update(block_d, nnx.state(block_s))
    tokens = _tokens(0)
    want = nnx.jit(lambda m, t: m(t))(dense, tokens)
    got, _ = _forward(sub, tokens, key=jax.random.key(3), mode="train", unit=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    twin = SubLLM(dense_twin(cfg), rngs=nnx.Rngs(5))
    nnx.update(twin, nnx.state(dense))
    np.testing.assert_allclose(_forward(twin, tokens, mode="infer")[0], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_inner_positions_are_original_positions(tiny, mode):
    tokens = _tokens(1)
    positions = 100 + jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape)
    _, aux = _forward(tiny, tokens, positions, mode=mode)
    sel1, sel2 = aux["selections"]
    pos1, pos2 = aux["positions"]
    np.testing.assert_array_equal(pos1, routing.gather(positions, sel1))
    original = jax.vmap(lambda i1, i2: i1[i2])(sel1.indices, sel2.indices)
    np.testing.assert_array_equal(pos2, 100 + original)
    assert np.all(np.diff(np.asarray(pos2), axis=-1) >= 0)
    if mode == "train":  # capacities ceil(0.64·32)=21, ceil(0.64·21)=14
        assert pos1.shape == (2, 21) and pos2.shape == (2, 14)


def test_parent_positions_option():
    model = SubLLM(_config(level_positions="parent"), rngs=nnx.Rngs(0))
    _, aux = _forward(model, _tokens(1), mode="train")
    np.testing.assert_array_equal(aux["positions"][1], aux["selections"][1].indices)


@pytest.mark.parametrize("capacity", [1.0, 0.5])
def test_infer_mode_is_causal(capacity):
    model = SubLLM(_config(infer_capacity=capacity), rngs=nnx.Rngs(2))
    def fwd(t):
        return _forward(model, t, mode="infer")[0]

    tokens = _tokens(2)
    base = fwd(tokens)
    for t in (3, 11, 20):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 256)
        out = fwd(changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=1e-6)
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_scorer_gets_gradient_in_train_mode(tiny):
    """Through train.lm_loss with the SUBLLM hidden_fn: the weights carry gradient to the scorers."""
    tokens = _tokens(3)
    batch = Batch(tokens, jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), tokens.shape),
                  jnp.zeros(tokens.shape, jnp.int32))
    fn = hidden_fn(mode="train", step=10, rng=jax.random.key(4))

    def loss(model):
        return lm_loss(model, batch, hidden_fn=fn)[0]

    value, grads = nnx.jit(nnx.value_and_grad(loss))(tiny)
    assert np.isfinite(float(value))
    for i in range(2):
        assert np.any(np.asarray(grads["scorers"][i]["weight"][...]) != 0.0)
        assert np.any(np.asarray(grads["bypasses"][i]["scale"][...]) != 0.0)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_padding_never_attended(tiny, mode):
    tokens = _tokens(4)
    segment_ids = jnp.asarray([[0] * 12 + [1] * 14 + [-1] * 6, [0] * 26 + [-1] * 6], jnp.int32)
    positions = jnp.asarray([list(range(12)) + list(range(14)) + [0] * 6,
                             list(range(26)) + [0] * 6], jnp.int32)
    def fwd(t):
        return _forward(tiny, t, positions, segment_ids, jax.random.key(5), mode=mode)[0]

    base = fwd(tokens)
    changed = fwd(tokens.at[:, 26:].set((tokens[:, 26:] + 13) % 256))
    np.testing.assert_allclose(changed[:, :26], base[:, :26], atol=1e-6, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(base)))
    _, aux = _forward(tiny, tokens, positions, segment_ids, jax.random.key(5), mode=mode)
    for sel, seg in zip(aux["selections"], aux["segment_ids"], strict=True):
        assert np.all(np.asarray(seg)[~np.asarray(sel.valid)] == -1)
    if mode == "infer":  # the first document never sees the second one
        doc = fwd(tokens.at[:, 12:26].set((tokens[:, 12:26] + 5) % 256))
        np.testing.assert_allclose(doc[0, :12], base[0, :12], atol=1e-6, rtol=1e-6)


def test_train_mode_requires_rng(tiny):
    with pytest.raises(ValueError, match="rng"):
        tiny(_tokens(0), mode="train")
    with pytest.raises(ValueError, match="mode"):
        tiny(_tokens(0), mode="eval")


def test_compiled_flops_follow_the_per_component_cost_model():
    """Spec cost model: linear work scales with the tokens each layer sees (0.7516 of dense for the
    24-layer structure at keep 0.64), attention scores with their square, the head not at all; the
    compiled FLOPs ratio SUBLLM / dense must match it within 2%."""
    m = preset("tiny").replace(d_model=128, n_heads=4, n_kv_heads=4, head_dim=32, ffn_dim=384,
                               n_layers=24, max_positions=1024)
    cfg = SubLLMConfig(model=m, structure="TTTTT(TTTTT(TTTT)TTTTT)TTTTT")
    t = 1024
    tokens = jnp.zeros((1, t), jnp.int32)

    def compiled_flops(config):
        model = SubLLM(config, attention_backend="xla", rngs=nnx.Rngs(0))
        fn = nnx.jit(lambda mdl, x: mdl(x, mode="topk"))
        return flops.compiled_flops(fn.lower(model, tokens).compile())  # loops fully counted

    linear = 2 * (m.d_model * m.q_dim + 2 * m.d_model * m.kv_dim + m.q_dim * m.d_model
                  + 3 * m.d_model * m.ffn_dim)  # per token per layer
    scores = 4 * m.n_heads * m.head_dim  # q·kᵀ and p·v per (query, key) pair per layer
    head = 2 * m.d_model * m.vocab_size
    n1 = math.ceil(0.64 * t)
    n2 = math.ceil(0.64 * n1)
    tokens_per_layer = [t] * 10 + [n1] * 10 + [n2] * 4
    assert sum(tokens_per_layer) / (24 * t) == pytest.approx(0.7516, rel=2e-3)
    model_sub = sum(n * linear + scores * n * n for n in tokens_per_layer) + t * head
    model_dense = 24 * (t * linear + scores * t * t) + t * head
    measured = compiled_flops(cfg) / compiled_flops(dense_twin(cfg))
    assert measured == pytest.approx(model_sub / model_dense, rel=0.02)


# --- weights as attention bias (weight_attn_bias, icefall's log-weight key bias) ---------------------


def _masked_attention(q, k, v, bias, kept, pos):
    """Causal attention over the kept keys only, logits + bias, written out (GQA by repetition);
    a row with no visible key gives zeros."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    visible = ((pos[:, None, :] <= pos[:, :, None]) & kept[:, None, :])[:, None]
    m = jnp.max(jnp.where(visible, logits, -1e30), axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(jnp.where(visible, logits, m) - m), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _full_length_reference(model: SubLLM, tokens):
    """Top-k-mode SUBLLM with weight_attn_bias written at full length, without gather or scatter:
    every layer runs on all rows; inside a level, keys outside it are masked and kept keys get
    log(w + 1e-3) summed over the levels they passed; upsampling keeps the level's rows only."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.zeros((b, t), jnp.int32)
    h = model.embed(tokens)
    kept, bias, stack = jnp.ones((b, t), bool), jnp.zeros((b, t), jnp.float32), []
    n_level = t
    for op in model.structure.ops:
        if op.kind == "layer":
            block = model.layers[op.index]
            if not stack:
                h = block(h, pos, seg)
                continue
            core = functools.partial(lambda bias, kept, q, k, v, *_: _masked_attention(
                q, k, v, bias, kept, pos), bias, kept)
            h = block.feed_forward(*block.attend_and_norm(h, pos, seg, core=core))
        elif op.kind == "down":
            scores = model.scorers[op.index](h)
            k = routing.capacity(n_level, op.keep)
            ranked = jnp.where(kept, scores, -jnp.inf)
            threshold = jnp.sort(ranked, axis=-1)[:, -k][:, None]
            new_kept = kept & (ranked >= threshold)
            w = jnp.where(new_kept, jnp.clip(scores, 0.0, 1.0), 0.0)
            stack.append((h, kept, bias, new_kept, w, n_level))
            kept, n_level = new_kept, k
            bias = bias + jnp.where(kept, jnp.log(w + 1e-3), 0.0)
        else:
            x, kept_above, bias_above, here, w, n_above = stack.pop()
            u = jnp.where(here[..., None], x + w[..., None] * (h - x), x)
            h = x + model.bypasses[op.index].scale[...] * (u - x)
            kept, bias, n_level = kept_above, bias_above, n_above
    return model.head(model.final_norm(h))


def test_weight_attn_bias_matches_the_full_length_reference():
    """Forward and every parameter's gradient (the scorers' included: the bias is differentiable in
    w) equal a full-length computation that never compacts the sequence."""
    model = SubLLM(_config(weight_attn_bias=True), rngs=nnx.Rngs(3))
    tokens = _tokens(4)
    cot = jax.random.normal(jax.random.key(5), (2, N, model.config.vocab_size))

    def loss_of(fn):
        return lambda m: jnp.sum(fn(m) * cot)

    ours = lambda m: m(tokens, mode="topk")
    ref = lambda m: _full_length_reference(m, tokens)
    np.testing.assert_allclose(ours(model), ref(model), atol=2e-5, rtol=2e-5)
    plain = SubLLM(_config(weight_attn_bias=False), rngs=nnx.Rngs(3))
    assert float(jnp.abs(plain(tokens, mode="topk") - ref(model)).max()) > 1e-4  # the bias matters
    g_ours = nnx.grad(loss_of(ours))(model)
    g_ref = nnx.grad(loss_of(ref))(model)
    flat_ours, flat_ref = nnx.to_flat_state(g_ours), nnx.to_flat_state(g_ref)
    assert [p for p, _ in flat_ours] == [p for p, _ in flat_ref]
    for (path, a), (_, r) in zip(flat_ours, flat_ref, strict=True):
        np.testing.assert_allclose(a[...], r[...], atol=1e-5, rtol=1e-3, err_msg=str(path))
    scorer_grads = [np.abs(np.asarray(v[...])).max() for p, v in flat_ours if "scorers" in p]
    assert min(scorer_grads) > 0.0


def test_weight_attn_bias_refuses_decoding_hooks():
    model = SubLLM(_config(weight_attn_bias=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_attn_bias"):
        model.forward(_tokens(0), mode="infer", layer_fn=lambda *a: None)


# --- train mode without a step: the schedules' defaults ---------------------------------------------


def test_train_mode_without_a_step_has_balancer_off_and_c_min_zero(monkeypatch):
    """step=None: Balancer probability 0 and bypass c_min 0 (icefall's ScheduledFloat defaults),
    not the step-0 schedule (p = 1.0, c_min = 0.9) forever."""
    import tokensparse.subllm.model as model_module
    import tokensparse.subllm.modules as modules_module

    model = SubLLM(_config(), rngs=nnx.Rngs(0))
    tokens = _tokens(2)
    cot = jax.random.normal(jax.random.key(6), (2, N, model.config.vocab_size))

    def grads(**kw):
        def loss(m):
            return jnp.sum(m(tokens, mode="train", rng=jax.random.key(4), **kw) * cot)
        return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.grad(loss)(model))}

    no_step, step_zero = grads(), grads(step=0)
    monkeypatch.setattr(model_module, "balance", lambda scores, **kw: scores)
    monkeypatch.setattr(modules_module, "limit_grad", lambda c, *a, **kw: c)
    neither = grads(step=0)
    for path, value in neither.items():
        np.testing.assert_allclose(no_step[path], value, atol=1e-7, rtol=1e-6, err_msg=path)
    scorer = [p for p in neither if "scorers" in p]
    assert any(np.abs(step_zero[p] - neither[p]).max() > 1e-6 for p in scorer)


# --- initialisation (the official code's) -----------------------------------------------------------


def test_spec_init_draws_the_official_scheme():
    cfg = _config()
    assert cfg.init == "spec"
    mc, std = cfg.model, cfg.model.init_std
    model = SubLLM(cfg, rngs=nnx.Rngs(0))
    emb = np.asarray(model.embed.embedding[...])
    assert abs(emb.std() / mc.d_model ** -0.5 - 1.0) < 0.03
    assert np.abs(emb).max() > 3.2 * mc.d_model ** -0.5  # the embedding is not truncated
    truncated_std = 0.98654  # std of a unit normal truncated at ±3

    def check(kernel, sigma):
        kernel = np.asarray(kernel)
        assert np.abs(kernel).max() <= 3.0 * sigma * (1 + 1e-6)
        assert abs(kernel.std() / (truncated_std * sigma) - 1.0) < 0.06

    check(model.lm_head.kernel[...], std)
    for layer in range(mc.n_layers):
        block = model.layers[layer]
        for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj,
                       block.mlp.gate_proj, block.mlp.up_proj):
            check(linear.kernel[...], std)
        for linear in (block.attn.o_proj, block.mlp.down_proj):
            check(linear.kernel[...], std / math.sqrt(2 * (layer + 1)))
    backbone = SubLLM(cfg.replace(init="backbone"), rngs=nnx.Rngs(0))
    assert abs(np.asarray(backbone.embed.embedding[...]).std() / std - 1.0) < 0.03
    # the dense twin (same seed) starts from the same backbone weights
    twin = SubLLM(dense_twin(cfg), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(twin.embed.embedding[...], emb)
    for layer in range(mc.n_layers):
        np.testing.assert_array_equal(twin.layers[layer].mlp.down_proj.kernel[...],
                                      model.layers[layer].mlp.down_proj.kernel[...])


def test_init_option_is_validated():
    with pytest.raises(ValueError, match="init"):
        _config(init="xavier")
