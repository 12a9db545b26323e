"""LeMo block informativeness as a Pallas kernel: tile maxima of Σ_h ReLU(q·kᵀ), never [T, T].

For query block m and key block n (``block_size`` tokens each) the kernel computes::

    tile[m, n] = scale · max_{i ∈ m, j ∈ n, valid_i, valid_j} Σ_h ReLU(q_ih · k_jh)

and 0 where no (i, j) pair is valid. One program handles one query block of one batch row: it walks
the key blocks (only n <= m when ``causal``), sums the positive per-head logits of each 64 x 64 tile
in fp32 and keeps the tile's maximum, so HBM only ever holds q, k and the [B, n_b, n_b] result.
This is :func:`kernels_pallas.reference.block_scores_reference` with ``normalizer`` folded into
``scale`` and without the −inf of empty key columns (``reference.empty_columns_neginf`` adds them).

Scores drive a discrete choice and carry no gradient: :func:`block_tiles` stops it, so ``jax.grad``
through it is zero (and never needs a VJP of the ``pallas_call``).

Lowering: Triton (GPU) or ``interpret=True`` (any platform; the CPU tests). Head counts, the head
dim and the number of blocks are padded to powers of two for Triton; the loops only visit the real
ones. There is no TPU lowering; :func:`supports` says so there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Bool, Float

from kernels_pallas.reference import platform_target


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pad_to(x: Array, axis: int, size: int) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _kernel(q_ref, k_ref, qvalid_ref, kvalid_ref, out_ref, *, heads: int, groups: int,
            n_blocks: int, block: int, scale: float, causal: bool, exclude_diagonal: bool):
    m = pl.program_id(1)
    q_valid = qvalid_ref[...] > 0
    row = jnp.zeros(out_ref.shape, jnp.float32)
    lanes = lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def tile(n, row):
        keys = pl.ds(pl.multiple_of(n * block, block), block)

        def head(h, acc):
            logits = lax.dot_general(q_ref[:, h, :], k_ref[keys, h // groups, :],
                                     (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)
            return acc + jnp.maximum(logits, 0.0)

        a = lax.fori_loop(0, heads, head, jnp.zeros((block, block), jnp.float32))
        mask = q_valid[:, None] & (kvalid_ref[keys] > 0)[None, :]
        if exclude_diagonal:
            rows = lax.broadcasted_iota(jnp.int32, (block, block), 0)
            cols = lax.broadcasted_iota(jnp.int32, (block, block), 1)
            mask &= (rows != cols) | (n != m)
        best = jnp.max(jnp.max(jnp.where(mask, a, 0.0), axis=1), axis=0)
        return jnp.where(lanes == n, best * scale, row)

    stop = jnp.minimum(m + 1, n_blocks) if causal else n_blocks
    out_ref[...] = lax.fori_loop(0, stop, tile, row)


def block_tiles(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    *,
    block_size: int = 64,
    valid: Bool[Array, "b t"] | None = None,
    scale: float = 1.0,
    causal: bool = False,
    exclude_diagonal: bool = False,
    interpret: bool = False,
) -> Float[Array, "b nb nb"]:
    """``tile[b, m, n]`` (query block m, key block n) as defined in the module docstring, in fp32.

    T need not be a multiple of ``block_size``: the tail is padded with invalid tokens. ``scale``
    multiplies every tile (ReLU and max commute with a positive factor). ``causal`` zeroes tiles with
    n > m without computing them. fp32 inputs use exact fp32 products; bf16/f16 inputs keep their
    dtype on the matrix units and accumulate in fp32.
    """
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, T, H, D] and [B, T, Hkv, D] "
                         f"with H a multiple of Hkv.")
    if valid is not None and valid.shape != (b, t):
        raise ValueError(f"valid has shape {valid.shape}; expected [B, T] = {(b, t)}.")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype}, {k.dtype}.")
    if not (isinstance(block_size, int) and block_size >= 16 and block_size == _next_pow2(block_size)):
        raise ValueError(f"block_size={block_size!r} must be a power of two >= 16 for the kernel.")
    if not scale > 0:
        raise ValueError(f"scale={scale} must be positive (ReLU and max commute only with it).")
    hkv = k.shape[2]
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    nb = math.ceil(t / block_size)
    nb_pad = max(_next_pow2(nb), 16)
    t_pad = nb * block_size
    valid = jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32)
    valid = _pad_to(valid, 1, t_pad)
    d_pad = max(16, _next_pow2(d))
    q = _pad_to(_pad_to(_pad_to(q, 1, t_pad), 2, _next_pow2(h)), 3, d_pad)
    k = _pad_to(_pad_to(_pad_to(k, 1, t_pad), 2, _next_pow2(hkv)), 3, d_pad)
    kernel = functools.partial(_kernel, heads=h, groups=h // hkv, n_blocks=nb, block=block_size,
                               scale=float(scale), causal=causal,
                               exclude_diagonal=exclude_diagonal)
    tiles = pl.pallas_call(
        kernel,
        grid=(b, nb),
        in_specs=[
            pl.BlockSpec((None, block_size, q.shape[2], d_pad), lambda bi, m: (bi, m, 0, 0)),
            pl.BlockSpec((None, t_pad, k.shape[2], d_pad), lambda bi, m: (bi, 0, 0, 0)),
            pl.BlockSpec((None, block_size), lambda bi, m: (bi, m)),
            pl.BlockSpec((None, t_pad), lambda bi, m: (bi, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, nb_pad), lambda bi, m: (bi, m, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nb, nb_pad), jnp.float32),
        interpret=interpret,
        name="lemo_block_tiles",
    )(q, k, valid, valid)
    return tiles[:, :, :nb]


def supports(q, k, *, block_size: int) -> str | None:
    """None when :func:`block_tiles` can score these inputs here (natively, or interpreted when
    ``TOKENSPARSE_PALLAS_INTERPRET`` is set); otherwise a short reason. Shape errors are left to
    :func:`block_tiles`, which raises them."""
    if (reason := platform_target(("triton",)).reason) is not None:
        return reason
    if q.dtype != k.dtype:
        return f"q and k dtypes differ ({q.dtype}, {k.dtype})"
    if not (isinstance(block_size, int) and block_size >= 16 and block_size == _next_pow2(block_size)):
        return f"block_size {block_size} is not a power of two >= 16"
    return None
