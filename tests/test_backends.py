"""The one backend dispatcher (``tokensparse.backends``) for attention and block scoring.

A backend named explicitly runs or raises a one-line ``ValueError`` (never a silent substitute);
``"auto"`` chooses and may fall back; ``resolve`` says which backend runs. On CPU the Pallas
kernels are reached through ``TOKENSPARSE_PALLAS_INTERPRET`` (``=1`` Triton, ``=tpu`` Mosaic).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_segment_attention import _JIT, INTERPRET, Case, make_inputs, make_layout, rel_err

import kernels_pallas
from kernels_pallas import register as R
from tokensparse import attention as A
from tokensparse import backends
from tokensparse.config import preset
from tokensparse.lemo import scoring
from tokensparse.lemo.scoring import ScoreOptions

needs_cpu = pytest.mark.skipif(not INTERPRET, reason="on a GPU the pallas backends are supported")


def _dispatch_inputs():
    case = Case("dispatch", tq=40, tk=40, h=4, hkv=2, d=16)
    rng = np.random.default_rng(7)
    q, k, v, _ = make_inputs(rng, case)
    return (q, k, v), make_layout(rng, case)


def _attention(backend, qkv, layout):
    q_pos, kv_pos, q_seg, kv_seg = layout
    fn = lambda q, k, v: A.attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True,
                                     backend=backend)
    return _JIT(fn)(*qkv)


def _score_inputs(b=1, t=32, h=2, hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
    return q, k


@pytest.fixture
def forced_interpret(monkeypatch):
    """Let the dispatcher reach the Triton kernels on CPU (interpret mode)."""
    if INTERPRET:
        monkeypatch.setenv(R.INTERPRET_ENV, "1")


# ----------------------------------------------------------------------------- the rule


def test_registered():
    assert "pallas" in A.backends()
    assert set(backends.names("block_scores")) == {"xla", "pallas"}
    assert kernels_pallas.INTERPRET_ENV == "TOKENSPARSE_PALLAS_INTERPRET"


@needs_cpu
def test_explicit_unsupported_attention_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv(R.INTERPRET_ENV, raising=False)
    qkv, layout = _dispatch_inputs()
    with pytest.raises(ValueError, match=r"'pallas' cannot run here: cpu platform.*'xla'") as info:
        _attention("pallas", qkv, layout)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot run here"):
        A.resolve("pallas", *qkv)
    assert A.resolve("auto", *qkv) == "xla"
    assert A.resolve_backend("auto", *qkv, causal=True).fn is A.xla_attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = _attention("auto", qkv, layout)
    np.testing.assert_array_equal(auto, _attention("xla", qkv, layout))


@needs_cpu
def test_explicit_unsupported_block_score_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv(R.INTERPRET_ENV, raising=False)
    q, k = _score_inputs()
    opts = ScoreOptions(block_size=16)
    want = scoring.block_scores(q, k, opts, backend="xla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" quietly uses the XLA scan off a GPU
        auto = scoring.block_scores(q, k, opts)
    np.testing.assert_array_equal(auto, want)
    assert scoring.resolve("auto", q, k, opts) == "xla"
    with pytest.raises(ValueError, match=r"'pallas' cannot run here: .*GPU.*'xla'") as info:
        scoring.block_scores(q, k, opts, backend="pallas")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="backend"):
        scoring.block_scores(q, k, opts, backend="triton")


def test_block_score_kernel_declines_shapes_it_cannot_score(forced_interpret):
    """With the kernel available, a block size it cannot tile raises when named, falls back under
    "auto"."""
    q, k = _score_inputs()
    opts = ScoreOptions(block_size=8)
    assert scoring.resolve("auto", q, k, opts) == "xla"
    with pytest.raises(ValueError, match="power of two"):
        scoring.resolve("pallas", q, k, opts)
    assert scoring.resolve("pallas", q, k, ScoreOptions(block_size=16)) == "pallas"


def test_resolve_accepts_shapes_and_model_configs():
    config = preset("tiny")
    q = jax.ShapeDtypeStruct((1, 64, config.n_heads, config.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 64, config.n_kv_heads, config.head_dim), jnp.float32)
    assert A.resolve("chunked", q, kv, kv) == "chunked"
    assert A.model_backend("chunked", config, seq_len=64) == "chunked"
    assert A.model_backend("auto", config, seq_len=64) == A.resolve("auto", q, kv, kv)
    with pytest.raises(ValueError, match="Unknown attention backend 'flashy'"):
        A.model_backend("flashy", config, seq_len=64)
    with pytest.raises(ValueError, match="Unknown operation"):
        backends.resolve("convolution", "auto")
    with pytest.raises(ValueError, match="not a backend name"):
        backends.register("attention", "auto", backends.Backend(A.xla_attention))


# ----------------------------------------------------------------------------- reaching the kernels


def test_dispatcher_uses_kernel_when_interpret_forced(monkeypatch):
    monkeypatch.setenv(R.INTERPRET_ENV, "1")
    qkv, layout = _dispatch_inputs()
    assert A.resolve_backend("pallas", *qkv, causal=True).fn is R.pallas_attention
    assert A.resolve_backend("auto", *qkv, causal=True).fn is R.pallas_attention
    assert A.resolve("auto", *qkv) == "pallas"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _attention("pallas", qkv, layout)
    want = A.reference_attention(*qkv, q_positions=layout[0], kv_positions=layout[1],
                                 q_segment_ids=layout[2], kv_segment_ids=layout[3], causal=True)
    assert rel_err(got, want) <= 1e-5


def test_dispatcher_reaches_tpu_kernel(monkeypatch):
    """With ``=tpu`` the backend runs the Mosaic kernel (here: one tile, no segment ids, so the
    segment mask is compiled out); ``=1`` keeps selecting the Triton kernel."""
    case = Case("dispatch", tq=40, tk=40, h=4, hkv=2, d=16, b=1)
    rng = np.random.default_rng(7)
    q_pos, kv_pos, _, _ = make_layout(rng, case)
    q, k, v, cot = make_inputs(rng, case)

    def dispatch():
        return lambda q, k, v: A.attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                           causal=True, backend="pallas")

    monkeypatch.setenv(R.INTERPRET_ENV, "tpu")
    assert R.interpret_mode() == "tpu" and R.supports(q, k, v, causal=True) is None
    assert R.supports(*(x.astype(jnp.float16) for x in (q, k, v)), causal=True) is not None
    assert A.resolve_backend("pallas", q, k, v, causal=True).fn is R.pallas_attention
    fn = dispatch()
    assert "segment_attention_tpu_fwd" in str(jax.make_jaxpr(fn)(q, k, v))

    def fwd_bwd(attn, q, k, v, cot):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(cot))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _JIT(functools.partial(fwd_bwd, fn))(q, k, v, cot)
    ref = functools.partial(A.reference_attention, q_positions=q_pos, kv_positions=kv_pos)
    want = fwd_bwd(ref, q, k, v, cot)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(x, r) <= 1e-5, name
    monkeypatch.setenv(R.INTERPRET_ENV, "1")
    jaxpr = str(jax.make_jaxpr(dispatch())(q, k, v))  # a fresh closure: traces are cached
    assert R.interpret_mode() == "gpu"
    assert "segment_attention_fwd" in jaxpr and "segment_attention_tpu_fwd" not in jaxpr


def test_scoring_pallas_backend_matches_reference(forced_interpret):
    """The ``"pallas"`` block-score backend (the kernel with the options folded in) equals the
    dense reference, flags included."""
    q, k = _score_inputs(b=2, t=80, h=4, hkv=2, d=8, seed=1)
    valid = jnp.asarray(np.random.default_rng(1).random((2, 80)) > 0.2)
    opts = ScoreOptions(block_size=16, causal=True, exclude_diagonal=True, scale_by_sqrt_d=True,
                        divide_by_heads=True)
    assert scoring.resolve("auto", q, k, opts) == "pallas"
    got = jax.jit(functools.partial(scoring.block_tiles, opts=opts, backend="pallas"))(
        q, k, valid=valid)
    want = scoring.block_scores_reference(q, k, opts, valid=valid)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(np.asarray(want))
    np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], rtol=1e-5,
                               atol=1e-7)


def test_empty_key_blocks_score_minus_inf_and_are_never_picked(forced_interpret):
    q, k = _score_inputs(b=2, t=64, h=2, hkv=1, d=8, seed=3)
    opts = ScoreOptions(block_size=16)
    valid = np.ones((2, 64), bool)
    valid[0, 16:32] = False  # a whole key block of row 0
    valid[1, 50:] = False  # a ragged tail of row 1: that block stays real
    valid = jnp.asarray(valid)
    cols = scoring.block_scores(q, k, opts, valid=valid, backend="pallas")
    want = scoring.column_scores(scoring.block_scores_reference(q, k, opts, valid=valid))
    assert np.isneginf(np.asarray(cols)[0, 1]) and np.isfinite(np.asarray(cols)[1]).all()
    np.testing.assert_allclose(cols, want, rtol=1e-6)
    sel = scoring.select_blocks(cols, 0.75, opts.block_size)
    assert 16 not in np.asarray(sel.indices)[0].tolist()


def test_no_gradient_flows_through_the_kernel_backend(forced_interpret):
    q, k = _score_inputs(b=1, t=32, h=2, hkv=2, d=8)
    fn = lambda q, k: scoring.block_scores(q, k, ScoreOptions(block_size=16),
                                           backend="pallas").sum()
    grads = jax.grad(fn, argnums=(0, 1))(q, k)
    assert float(fn(q, k)) > 0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
