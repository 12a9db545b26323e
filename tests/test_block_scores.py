"""The LeMo block-scoring kernel vs the dense reference in ``tokensparse.lemo.scoring``.

On CPU the kernel runs with ``interpret=True``; with TOKENSPARSE_TEST_PLATFORM=gpu the same cases run
the Triton lowering. Every case has its own shapes, so each compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_scores as K
from kernels_pallas import register as R
from tokensparse.lemo import scoring
from tokensparse.lemo.scoring import ScoreOptions
from tokensparse.metrics import compiled_memory

INTERPRET = jax.default_backend() != "gpu"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    h: int
    hkv: int
    d: int
    block: int = 16
    causal: bool = False
    exclude_diagonal: bool = False
    scale_by_sqrt_d: bool = False
    divide_by_heads: bool = False
    invalid: float = 0.0  # fraction of tokens marked invalid at random
    dtype: str = "float32"


CASES = [
    Case("mha_whole_blocks", b=2, t=64, h=2, hkv=2, d=16),
    Case("gqa_ragged_tail", b=2, t=100, h=4, hkv=2, d=8, invalid=0.2),
    Case("causal_exclude_diagonal", b=1, t=80, h=3, hkv=1, d=12, causal=True,
         exclude_diagonal=True, scale_by_sqrt_d=True),
    Case("block32_heads_not_pow2", b=2, t=96, h=6, hkv=3, d=16, block=32, causal=True,
         divide_by_heads=True, invalid=0.3),
    Case("exclude_diagonal_many_tiles", b=1, t=208, h=1, hkv=1, d=4, exclude_diagonal=True),
    Case("bf16", b=1, t=72, h=4, hkv=4, d=16, dtype="bfloat16", invalid=0.1),
]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.normal(size=(case.b, case.t, case.h, case.d)), dtype)
    k = jnp.asarray(rng.normal(size=(case.b, case.t, case.hkv, case.d)), dtype)
    valid = jnp.asarray(rng.random((case.b, case.t)) >= case.invalid)
    return q, k, valid


def _opts(case: Case) -> ScoreOptions:
    return ScoreOptions(block_size=case.block, causal=case.causal,
                        exclude_diagonal=case.exclude_diagonal,
                        scale_by_sqrt_d=case.scale_by_sqrt_d, divide_by_heads=case.divide_by_heads)


@pytest.fixture
def forced_interpret(monkeypatch):
    """Let ``scoring``'s dispatcher reach the kernel on CPU (interpret mode)."""
    if INTERPRET:
        monkeypatch.setenv(R.INTERPRET_ENV, "1")


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    return float(np.abs(got[finite] - want[finite]).max() / max(np.abs(want[finite]).max(), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tiles_equal_dense_reference(case, forced_interpret):
    q, k, valid = _inputs(case)
    opts = _opts(case)
    want = scoring.block_scores_reference(q, k, opts, valid=valid)
    got = jax.jit(functools.partial(scoring.block_tiles, opts=opts, backend="pallas"))(
        q, k, valid=valid)
    assert got.shape == want.shape == (case.b, -(-case.t // case.block), -(-case.t // case.block))
    assert _rel_err(got, want) <= TOL[case.dtype]
    # The case is not degenerate: tiles differ, and masking/causality left zeros where expected.
    finite = np.asarray(want)[np.isfinite(np.asarray(want))]
    assert finite.max() > 0 and np.unique(finite).size > 4
    if case.causal:
        upper = np.triu(np.ones(want.shape[1:], bool), 1)
        assert np.all(np.asarray(got)[:, upper][np.isfinite(np.asarray(got)[:, upper])] == 0)


def test_empty_key_blocks_score_minus_inf_and_are_never_picked(forced_interpret):
    case = Case("empty_block", b=2, t=64, h=2, hkv=1, d=8)
    q, k, _ = _inputs(case, seed=3)
    valid = np.ones((2, 64), bool)
    valid[0, 16:32] = False  # a whole key block of row 0
    valid[1, 50:] = False  # a ragged tail of row 1: that block stays real
    valid = jnp.asarray(valid)
    cols = scoring.block_scores(q, k, _opts(case), valid=valid, backend="pallas")
    want = scoring.column_scores(scoring.block_scores_reference(q, k, _opts(case), valid=valid))
    assert np.isneginf(np.asarray(cols)[0, 1]) and np.isfinite(np.asarray(cols)[1]).all()
    np.testing.assert_allclose(cols, want, rtol=1e-6)
    sel = scoring.select_blocks(cols, 0.75, case.block)
    assert 16 not in np.asarray(sel.indices)[0].tolist()


def test_no_gradient_flows_through_the_kernel(forced_interpret):
    case = Case("grad", b=1, t=32, h=2, hkv=2, d=8)
    q, k, valid = _inputs(case)
    fn = lambda q, k: scoring.block_scores(q, k, _opts(case), valid=valid, backend="pallas").sum()
    grads = jax.grad(fn, argnums=(0, 1))(q, k)
    assert float(fn(q, k)) > 0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.skipif(not INTERPRET, reason="the fallback only happens off a GPU")
def test_dispatch_on_cpu_without_interpret(monkeypatch):
    monkeypatch.delenv(R.INTERPRET_ENV, raising=False)
    case = Case("dispatch", b=1, t=32, h=2, hkv=2, d=8)
    q, k, valid = _inputs(case)
    want = scoring.block_scores(q, k, _opts(case), valid=valid, backend="xla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" quietly uses the XLA scan off a GPU
        auto = scoring.block_scores(q, k, _opts(case), valid=valid)
    with pytest.warns(UserWarning, match="unavailable"):
        forced = scoring.block_scores(q, k, _opts(case), valid=valid, backend="pallas")
    np.testing.assert_array_equal(auto, want)
    np.testing.assert_array_equal(forced, want)
    assert K.supports(64) is not None and "gpu" in K.supports(64).lower()
    with pytest.raises(ValueError, match="backend"):
        scoring.block_scores(q, k, _opts(case), backend="triton")


def test_bad_arguments_are_rejected():
    q = jnp.zeros((1, 32, 4, 8))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        K.block_tiles(q, jnp.zeros((1, 32, 3, 8)), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        K.block_tiles(q, jnp.zeros((1, 32, 2, 8)), block_size=24, interpret=True)
    with pytest.raises(ValueError, match="valid"):
        K.block_tiles(q, jnp.zeros((1, 32, 2, 8)), valid=jnp.ones((1, 31), bool), interpret=True)
    with pytest.raises(ValueError, match="scale"):
        K.block_tiles(q, jnp.zeros((1, 32, 2, 8)), scale=-1.0, interpret=True)


def test_kernel_memory_is_linear_in_sequence_length():
    """No [T, T] buffer: doubling T roughly doubles the kernel path's temp bytes."""

    def temps(t):
        q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        fn = functools.partial(K.block_tiles, block_size=64, interpret=INTERPRET)
        return compiled_memory(jax.jit(fn), q, k).temp_bytes

    small, large = temps(1024), temps(2048)
    assert large / small < 3.0, (small, large)
    assert large < 2048 * 2048 * 4 / 8, large
