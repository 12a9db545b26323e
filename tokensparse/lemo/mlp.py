"""LeMo's SwiGLU MLP: exact forward, channel-sparse backward (the paper's MLP approximation).

The forward runs on every token and every channel, so outputs are exactly the dense MLP's. The
backward flows only through the ``keep`` intermediate channels with the largest
r_c = ‖silu(g)[:, c]‖₂ + ‖v[:, c]‖₂, so only g and v on those channels are saved: the MLP's saved
activations shrink from 2·I to 2·C values per token (the point of the method). dx is approximate
and lower layers' LoRA gradients are biased accordingly; with ``keep = I`` it is exact.

**Frozen MLP weights only.** The custom VJP returns *zero* gradients for ``w_gate``, ``w_up`` and
``w_down``: it is only correct when the MLP is not trained (LeMo's recipe: LoRA on q, k, v, o).
:func:`sparse_backward_mlp` refuses MLPs that carry adapters, and raises when differentiated with
respect to the MLP weights themselves (e.g. ``make_train_step(..., wrt=nnx.Param)``) instead of
silently giving them zero gradients.

Channels are ranked over all B·T tokens of the call together (one channel set per batch, as the
artifact does), not per row; padding tokens take part in the ranking.

:func:`recomputed_mlp` is the exact alternative (``mlp_mode="recompute"``, a library option): it
saves only the MLP's input, D values per token, and recomputes g and v in the backward. That is
fewer saved values than the channel-sparse backward's 2·C whenever D ≤ 2·C (SmolLM2-135M and
Llama2-7B at p = 0.8: 576 vs 614, 4096 vs 4402), at the price of the two input projections run
again in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tokensparse import routing
from tokensparse.llama import MLP
from tokensparse.remat import checkpointed
from tokensparse.sharding import gather_for_use, gathered_on_use, seq_pieces, seq_shards


def keep_channels(ffn_dim: int, drop_fraction: float = 0.8) -> int:
    """C = floor(I · (1 − p)), at least 1: channels kept in backward when dropping fraction p."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction={drop_fraction} must be in [0, 1) (use a dense MLP to "
                         f"keep every channel's gradient, i.e. drop_fraction=0).")
    return routing.capacity(ffn_dim, 1.0 - drop_fraction, rounding="floor")


def _silu_grad(g):
    s = jax.nn.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


def _rank_channels(g, v, keep: int, rows: int = 1024) -> Int[Array, " c"]:
    """The ``keep`` channels with the largest ‖silu(g)_c‖₂ + ‖v_c‖₂ over all tokens, ascending.

    Sums of squares accumulate in fp32 over blocks of ``rows`` tokens, so no fp32 copy of the
    [tokens, I] activations is ever materialised (it would be the step's memory peak). Each batch
    row and sequence shard sums its own tokens and only the [2, I] partial sums are added across
    them: on a mesh, a scan over all tokens would gather the activations onto every device.
    """
    g, v = (_pieces(x) for x in (g, v))  # [rows, sequence shards, tokens per shard, I]
    sums_of = functools.partial(_sums_of_squares, rows=rows)
    sums = jax.vmap(jax.vmap(sums_of))(g, v).sum((0, 1))
    _, idx = jax.lax.top_k(jnp.sqrt(sums[0]) + jnp.sqrt(sums[1]), keep)
    return jnp.sort(idx)


def _pieces(x: Float[Array, "b t i"]) -> Float[Array, "b s n i"]:
    """[B, T, I] as [B, S, T/S, I] pieces over the mesh (S = 1 without a seq split), so per-piece
    sums stay on their devices; other shapes become one piece."""
    if x.ndim != 3:
        return x.reshape(1, 1, -1, x.shape[-1])
    shards = seq_shards() if x.shape[1] % seq_shards() == 0 else 1
    return seq_pieces(x, shards, ("act_mlp",))


def _sums_of_squares(g, v, rows: int) -> Float[Array, "2 i"]:
    """[Σ silu(g)², Σ v²] per channel over the tokens of g, v [N, I], ``rows`` at a time in fp32."""
    rows = min(rows, g.shape[0])
    pad = -g.shape[0] % rows  # zero rows add nothing: silu(0) = 0
    g, v = (jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, rows, x.shape[-1]) for x in (g, v))

    def add_block(sums, block):
        gb, vb = (x.astype(jnp.float32) for x in block)
        return sums + jnp.stack([jnp.sum(jnp.square(jax.nn.silu(gb)), 0), jnp.sum(vb * vb, 0)]), None

    sums, _ = jax.lax.scan(add_block, jnp.zeros((2, g.shape[-1]), jnp.float32), (g, v))
    return sums


def _forward(x, w_gate, w_up, w_down):
    g = jnp.dot(x, w_gate)
    v = jnp.dot(x, w_up)
    return jnp.dot(jax.nn.silu(g) * v, w_down), g, v


WeightAxes = tuple[tuple[str | None, ...] | None, ...] | None


def _gathered(weights, weight_axes: WeightAxes):
    """The weights laid out for use (FSDP split gathered) when their axes are given. The barrier
    keeps XLA from merging a backward gather with the forward's (for keep = I they are the same)
    and from fusing a stacked weight's per-layer slice into the gather (see llama.with_gathered)."""
    if weight_axes is None:
        return weights
    weights = jax.lax.optimization_barrier(tuple(weights))
    return tuple(gather_for_use(w, names) for w, names in zip(weights, weight_axes, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def channel_sparse_swiglu(
    x: Float[Array, "... d"],
    w_gate: Float[Array, "d i"],
    w_up: Float[Array, "d i"],
    w_down: Float[Array, "i d"],
    keep: int,
    weight_axes: WeightAxes = None,
    frozen: bool = False,
) -> Float[Array, "... d"]:
    """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` with a backward through ``keep`` channels.

    ``keep`` (C) is a static Python int in [1, I]. Weights use the [in, out] layout. Weight
    gradients are zeros: use only with frozen MLP weights (see the module docstring).

    ``weight_axes``, the three weights' logical axes, says that the weights come as stored, e.g.
    split over ``fsdp``: they are gathered for the forward (:func:`sharding.gather_for_use`) and the
    backward keeps the stored shards, not the gathered weights, gathering only the kept channels'
    rows and columns again (ZeRO-3). None: the weights are used as given.

    ``frozen=True`` raises ``ValueError`` when the weights are differentiated (their gradient
    would silently be zero).
    """
    _check_keep(keep, w_gate.shape[-1])
    return _forward(x, *_gathered((w_gate, w_up, w_down), weight_axes))[0]


def _check_keep(keep, ffn_dim: int) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or not 1 <= keep <= ffn_dim:
        raise ValueError(f"keep={keep!r} must be a static int in [1, {ffn_dim}] (the MLP width); "
                         f"see keep_channels().")


def _fwd(x, w_gate, w_up, w_down, keep, weight_axes, frozen):
    # symbolic_zeros: each differentiable argument comes as (value, perturbed).
    trained = [n for n, w in zip(("gate_proj", "up_proj", "down_proj"), (w_gate, w_up, w_down),
                                 strict=True) if w.perturbed]
    if frozen and trained:
        raise ValueError(f"the MLP weights {trained} are being trained, but LeMo's channel-sparse "
                         "MLP backward (lemo.mlp_mode='channel_sparse_bwd') gives them zero "
                         "gradients: train LoRA adapters only (wrt=tokensparse.lora.LoRAParam) or "
                         "use lemo.mlp_mode='dense' or 'recompute'.")
    x, w_gate, w_up, w_down = (p.value for p in (x, w_gate, w_up, w_down))
    _check_keep(keep, w_gate.shape[-1])
    out, g, v = _forward(x, *_gathered((w_gate, w_up, w_down), weight_axes))
    if keep == w_gate.shape[-1]:  # every channel: exact backward, nothing to rank or gather
        idx = jnp.arange(keep, dtype=jnp.int32)
        g_c, v_c = g, v
    else:
        idx = _rank_channels(g, v, keep)
        g_c, v_c = jnp.take(g, idx, axis=-1), jnp.take(v, idx, axis=-1)
        # Tie the output to the kept channels: otherwise XLA's scheduler may postpone the ranking and
        # gathers past later layers, keeping the full g and v alive (measured: +5.4 T·D per layer).
        out, g_c, v_c = jax.lax.optimization_barrier((out, g_c, v_c))
    # Residuals: g and v on the kept channels only; the weights as they came (arguments, not
    # activations: with weight_axes, this device's shards). The empty array carries x's dtype,
    # which dx must have.
    return out, (g_c, v_c, idx, w_gate, w_up, w_down, jnp.zeros((0,), x.dtype))


def _bwd(keep, weight_axes, frozen, residuals, grad_out):
    if isinstance(grad_out, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    g_c, v_c, idx, w_gate, w_up, w_down, x_proto = residuals
    wg_c, wu_c, wd_c = w_gate, w_up, w_down
    if keep != w_gate.shape[-1]:
        wg_c, wu_c = jnp.take(w_gate, idx, axis=1), jnp.take(w_up, idx, axis=1)
        wd_c = jnp.take(w_down, idx, axis=0)
    if weight_axes is not None:
        # Select the kept channels on the shards first, then gather only those: C of I channels.
        wg_c, wu_c, wd_c = _gathered((wg_c, wu_c, wd_c), weight_axes)
    delta = jnp.dot(grad_out, wd_c.T)  # [..., C]
    grad_g = delta * v_c * _silu_grad(g_c)
    grad_v = delta * jax.nn.silu(g_c)
    dx = jnp.dot(grad_g, wg_c.T) + jnp.dot(grad_v, wu_c.T)
    # None = symbolic zero: frozen weights get no cotangent buffers at all.
    return dx.astype(x_proto.dtype), None, None, None


channel_sparse_swiglu.defvjp(_fwd, _bwd, symbolic_zeros=True)


def sparse_backward_mlp(mlp: MLP, x: Float[Array, "b t d"], keep: int) -> Float[Array, "b t d"]:
    """``mlp(x)`` exactly, with the channel-sparse backward, for a frozen ``llama.MLP``.

    Computes in the module's compute dtype, like the module itself. Raises ``ValueError`` if any of
    its projections carries an adapter, or (when differentiated) if the MLP weights themselves are
    being trained: either would get no gradient.
    """
    projections = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj,
                   "down_proj": mlp.down_proj}
    adapted = [name for name, linear in projections.items() if linear.adapter is not None]
    if adapted:
        raise ValueError(f"MLP projections {adapted} carry adapters; the channel-sparse backward "
                         f"gives no weight gradients and needs frozen MLP weights. Use a dense MLP "
                         f"(mlp_mode='dense') or drop the MLP LoRA targets.")
    dtype = mlp.gate_proj.dtype
    kernels = [linear.kernel for linear in projections.values()]
    # The stored (e.g. FSDP-split) weights go in with their axes: the VJP gathers them for the
    # forward and saves the shards, not the gathered weights, for the backward.
    axes = tuple(k.get_metadata().get("logical_axes") for k in kernels)
    values = [k[...].astype(dtype) for k in kernels]
    split = any(gathered_on_use(v, a) for v, a in zip(values, axes, strict=True))
    return channel_sparse_swiglu(x.astype(dtype), *values, keep, axes if split else None, True)


def recomputed_mlp(mlp: MLP, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    """``mlp(x)`` with the exact backward, saving only ``x``: g, v and silu(g) are recomputed there.

    Works with adapters on the MLP too (their gradients are exact)."""
    return checkpointed(lambda module, u: module(u))(mlp, x)
