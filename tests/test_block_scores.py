"""The LeMo block-scoring kernel vs the dense reference in ``kernels_pallas.reference``.

On CPU the kernel runs with ``interpret=True``; with TOKENSPARSE_TEST_PLATFORM=gpu the same cases run
the Triton lowering. Every case has its own shapes, so each compiles once. Imports nothing from
``tokensparse``; the ``tokensparse.lemo.scoring`` dispatcher's use of the kernel is tested in
``test_backends``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_scores as K
from kernels_pallas import reference

INTERPRET = jax.default_backend() != "gpu"
NORMALIZER = 1024.0  # LeMo's default normaliser (ScoreOptions.normalizer)


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


def _opts(case: Case) -> dict:
    """The reference's keyword arguments for the case (LeMo's options, spelled out)."""
    scale = (1 / math.sqrt(case.d) if case.scale_by_sqrt_d else 1.0) / (
        case.h if case.divide_by_heads else 1.0)
    return dict(block_size=case.block, causal=case.causal, exclude_diagonal=case.exclude_diagonal,
                scale=scale, normalizer=NORMALIZER)


def _kernel_tiles(q, k, valid=None, *, block_size, causal, exclude_diagonal, scale, normalizer):
    """The kernel with the reference's arguments: normaliser folded into the scale, −inf columns
    for key blocks without a valid token (as the reference has them)."""
    tiles = K.block_tiles(q, k, block_size=block_size, valid=valid, scale=scale / normalizer,
                          causal=causal, exclude_diagonal=exclude_diagonal, interpret=INTERPRET)
    mask = reference.block_token_mask(valid, q.shape[0], q.shape[1], block_size)
    return reference.empty_columns_neginf(tiles, mask, block_size)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    return float(np.abs(got[finite] - want[finite]).max() / max(np.abs(want[finite]).max(), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tiles_equal_dense_reference(case):
    q, k, valid = _inputs(case)
    opts = _opts(case)
    want = reference.block_scores_reference(q, k, valid=valid, **opts)
    got = jax.jit(functools.partial(_kernel_tiles, **opts))(q, k, valid=valid)
    assert got.shape == want.shape == (case.b, -(-case.t // case.block), -(-case.t // case.block))
    assert _rel_err(got, want) <= TOL[case.dtype]
    # The case is not degenerate: tiles differ, and masking/causality left zeros where expected.
    finite = np.asarray(want)[np.isfinite(np.asarray(want))]
    assert finite.max() > 0 and np.unique(finite).size > 4
    if case.causal:
        upper = np.triu(np.ones(want.shape[1:], bool), 1)
        assert np.all(np.asarray(got)[:, upper][np.isfinite(np.asarray(got)[:, upper])] == 0)


def test_no_gradient_flows_through_the_kernel():
    case = Case("grad", b=1, t=32, h=2, hkv=2, d=8)
    q, k, valid = _inputs(case)
    fn = lambda q, k: _kernel_tiles(q, k, valid, **_opts(case)).sum()
    grads = jax.grad(fn, argnums=(0, 1))(q, k)
    assert float(fn(q, k)) > 0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


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


def test_supports(monkeypatch):
    """Off a GPU the kernel declines unless interpret mode is forced; bad shapes are declined."""
    q = jnp.zeros((1, 32, 2, 8))
    monkeypatch.delenv(reference.INTERPRET_ENV, raising=False)
    if INTERPRET:
        reason = K.supports(q, q, block_size=64)
        assert reason is not None and "gpu" in reason.lower()
    monkeypatch.setenv(reference.INTERPRET_ENV, "1")
    assert K.supports(q, q, block_size=64) is None
    assert "power of two" in K.supports(q, q, block_size=24)
    assert "dtypes differ" in K.supports(q, q.astype(jnp.bfloat16), block_size=64)


def test_kernel_memory_is_linear_in_sequence_length():
    """No [T, T] buffer: doubling T roughly doubles the kernel path's temp bytes."""

    def temps(t):
        q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        fn = functools.partial(K.block_tiles, block_size=64, interpret=INTERPRET)
        return jax.jit(fn).lower(q, k).compile().memory_analysis().temp_size_in_bytes

    small, large = temps(1024), temps(2048)
    assert large / small < 3.0, (small, large)
    assert large < 2048 * 2048 * 4 / 8, large
