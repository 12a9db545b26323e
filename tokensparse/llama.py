"""The dense Llama-family decoder (NNX), with a token-routed attention sub-layer.

Modules own parameters; the math is in pure functions (:func:`swiglu`, ``rope``, ``attention``). The
decoder block's attention sub-layer optionally takes a :class:`~tokensparse.routing.Selection`: it
then runs only on the selected tokens (at their original positions) and adds its output back into
the residual at those rows; unselected tokens pass through unchanged. This is the hook LeMo and
SUBLLM build on. With the selection of all tokens it is exactly the dense block.

Weights use the ``[in, out]`` layout; :mod:`tokensparse.hf` transposes Hugging Face's ``[out, in]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tokensparse import layer_loop, routing, sharding
from tokensparse.attention import attention
from tokensparse.config import ModelConfig
from tokensparse.layer_loop import Layer, residual, with_residual
from tokensparse.layer_stack import LayerStack
from tokensparse.remat import (
    check_remat,
    checkpointed,
    remat_policy,
    tag,
    tagging,
    tagging_enabled,
    uses_names,
)
from tokensparse.rope import apply_rope, inverse_frequencies
from tokensparse.routing import Selection
from tokensparse.sharding import constrain
from tokensparse.validation import check_token_ids


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """Bias-free ``x @ kernel`` with an optional additive ``adapter`` (e.g. LoRA) on the same input."""

    def __init__(self, in_features: int, out_features: int, *, std: float, dtype, param_dtype,
                 axes: tuple[str, str] = ("embed", "mlp"), rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), std, param_dtype),
                                logical_axes=axes)
        self.adapter = nnx.data(None)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "... i"]) -> Float[Array, "... o"]:
        y = with_gathered(functools.partial(_matmul, dtype=self.dtype), x.astype(self.dtype),
                          self.kernel)
        if self.adapter is not None:
            y = y + self.adapter(x).astype(y.dtype)
        return y


def _matmul(x, kernel, *, dtype):
    return jnp.dot(x, kernel.astype(dtype))


def gathered_for_use(weight: nnx.Param) -> Array:
    """The weight with its FSDP (``embed``) split gathered, other splits kept: ZeRO-3 moves weights,
    never activations (left alone, XLA may instead keep the weight split and all-reduce the
    [B, T, F] product, which costs more than the weight whenever B·T exceeds the model dimension).
    The gradient of the gather is a reduce-scatter. Identity without a mesh.

    A gathered value that a differentiated computation uses becomes a backward residual: every
    layer's whole weight would stay alive from the forward to the backward. Big frozen weights go
    through :func:`with_gathered` instead, which gathers them again in the backward."""
    return sharding.gather_for_use(weight[...], weight.get_metadata().get("logical_axes"))


def with_gathered(fn: Callable[..., Array], x: Array, *weights: nnx.Param) -> Array:
    """``fn(x, *values)`` on the weights' values gathered for use (:func:`gathered_for_use`), with
    the gathers repeated in the backward instead of their results saved.

    Where a mesh splits a weight over ``fsdp``, the call is a ``jax.checkpoint`` that saves nothing
    of its own: the backward keeps the weight *shards* (which are the parameters, already in memory)
    and ``x`` only if a weight is differentiated, all-gathers the weights once more and runs only
    what the gradient needs (for a frozen weight under LoRA: ``dy @ w.T``, no weight gradient). That
    is ZeRO-3's schedule: at any time only the layers in use hold gathered weights. ``fn`` should be
    cheap to recompute (a projection); its checkpoint barrier keeps XLA from merging the backward's
    gather with the forward's. Without such a split, e.g. on one device, it is just ``fn``.
    """
    names = [w.get_metadata().get("logical_axes") for w in weights]
    values = [w[...] for w in weights]
    if not any(sharding.gathered_on_use(v, n) for v, n in zip(values, names, strict=True)):
        return fn(x, *values)

    def gathered(x, *values):
        values = jax.lax.optimization_barrier(values)
        return fn(x, *(sharding.gather_for_use(v, n) for v, n in zip(values, names, strict=True)))

    return jax.checkpoint(gathered, policy=jax.checkpoint_policies.nothing_saveable)(x, *values)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return rms_norm(x, self.scale[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def rms_norm(x, scale, eps: float, dtype):
    """RMSNorm in fp32. Rematerialised: backward keeps only ``x`` (not its fp32 copies), which
    matters for long contexts where each saved [T, D] fp32 tensor costs as much as several bf16 ones."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(dtype)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab_size, dim), std, param_dtype),
                                   logical_axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        # An id outside the table would embed as NaN (or wrap, if negative): concrete ids are checked
        # here, traced ones in debug mode under checkify (tokensparse.validation).
        check_token_ids(tokens, self.embedding.shape[0])
        # FSDP gathers the table's model dimension before the lookup, not the looked-up activations.
        return jnp.take(gathered_for_use(self.embedding), tokens, axis=0).astype(self.dtype)



def swiglu(x, gate_proj, up_proj, down_proj):
    """SwiGLU: down(silu(gate(x)) * up(x)); the projections are callables."""
    return down_proj(gated(gate_proj(x), up_proj(x)))


@jax.checkpoint
def gated(g, u):
    """silu(g) * u, rematerialised: backward keeps g and u only (not silu's intermediates)."""
    return jax.nn.silu(g) * u


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, layer: int, rngs: nnx.Rngs):
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)
        std = config.init_std
        self.gate_proj = Linear(config.d_model, config.ffn_dim, std=std, **kw)
        self.up_proj = Linear(config.d_model, config.ffn_dim, std=std, **kw)
        self.down_proj = Linear(config.ffn_dim, config.d_model, std=_out_std(config, layer),
                                axes=("mlp", "embed"), **kw)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


def _out_std(config: ModelConfig, layer: int) -> float:
    """Residual-branch output projections start smaller with depth (GPT-2 / OLMo-style scaling)."""
    return config.init_std / (2 * (layer + 1)) ** 0.5


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE at explicit positions."""

    def __init__(self, config: ModelConfig, *, layer: int, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)
        std = config.init_std
        self.q_proj = Linear(config.d_model, config.q_dim, std=std, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(config.d_model, config.kv_dim, std=std, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(config.d_model, config.kv_dim, std=std, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(config.q_dim, config.d_model, std=_out_std(config, layer),
                             axes=("heads", "embed"), **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = (config.n_heads, config.n_kv_heads,
                                                        config.head_dim)
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling
        self.backend = attention_backend

    def project_qkv(self, u: Float[Array, "b t d"], positions: Int[Array, "b t"]):
        """q, k (rotated at ``positions``) and v, shaped [B, T, heads, head_dim]."""
        b, t, _ = u.shape
        q = self.q_proj(u).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(u).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(u).reshape(b, t, self.n_kv_heads, self.head_dim)
        inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def core(self, q, k, v, positions: Int[Array, "b t"], segment_ids=None, kv_positions=None,
             kv_segment_ids=None) -> Float[Array, "b t h dh"]:
        """Causal attention of projected q, k, v at ``positions`` (backend per ``self.backend``);
        keys sit at ``kv_positions`` / ``kv_segment_ids`` when they differ from the queries' (a KV
        cache)."""
        if kv_positions is None:
            kv_positions, kv_segment_ids = positions, segment_ids
        return attention(q, k, v, q_positions=positions, kv_positions=kv_positions,
                         q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=True,
                         backend=self.backend)

    def project_out(self, out: Float[Array, "b t h dh"]) -> Float[Array, "b t d"]:
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def __call__(self, u: Float[Array, "b t d"], positions: Int[Array, "b t"],
                 segment_ids: Int[Array, "b t"] | None = None) -> Float[Array, "b t d"]:
        """Self-attention over the tokens in ``u`` (already normed, possibly a compacted subset)."""
        return self.project_out(self.core(*self.project_qkv(u, positions), positions, segment_ids))


class DecoderBlock(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, *, layer: int, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        kw = dict(eps=config.rms_eps, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.input_norm = RMSNorm(config.d_model, **kw)
        self.attn = Attention(config, layer=layer, attention_backend=attention_backend, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.d_model, **kw)
        self.mlp = MLP(config, layer=layer, rngs=rngs)

    def attend(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"],
               segment_ids: Int[Array, "b t"] | None = None,
               selection: Selection | None = None) -> Float[Array, "b t d"]:
        """The attention half: x plus attention output, on all tokens or only the selected ones."""
        return self.attend_and_norm(x, positions, segment_ids, selection)[0]

    def attend_and_norm(self, x, positions, segment_ids=None, selection: Selection | None = None,
                        kv_cache: Callable | None = None, core: Callable | None = None):
        """``(h, post_attn_norm(h))`` with ``h = x + attention(input_norm(x))``.

        With a ``selection`` the attention runs only on the selected rows (gathered, at their
        original positions) and its output is added back at those rows; other rows pass through.
        ``kv_cache(k, v) -> (k, v, kv_positions, kv_segment_ids)`` (decoding) stores the rows'
        rotated keys and values and returns the keys and values to attend to. ``core`` replaces
        the attention core (:meth:`Attention.core`'s signature; e.g. LeMo's two-dimensional
        sparsity).

        Memory: the backward keeps ``x`` and what attention itself needs (q, k, v, its output and
        logsumexp), not the normed inputs, RoPE tables or ``h``: two small rematerialised regions
        recompute the norms and the output projection (one [rows, D] x [D, D] matmul) instead.
        """
        if selection is None:
            rows_pos, rows_seg = positions, segment_ids
        else:
            seg = jnp.zeros(positions.shape, jnp.int32) if segment_ids is None else segment_ids
            rows_pos = routing.gather(positions, selection)
            rows_seg = routing.gather(seg, selection, fill_value=-1)
            if kv_cache is None and _recovers(self, selection):
                return _recovering_attend(self, x, rows_pos, rows_seg, selection,
                                          core or self.attn.core)
        q, k, v = tag(checkpointed(_normed_qkv)(self, x, rows_pos, selection), "qkv")
        q, k, v = shard_qkv(q, k, v)
        kv_pos = kv_seg = None
        if kv_cache is not None:
            k, v, kv_pos, kv_seg = kv_cache(k, v)
        out = tag((core or self.attn.core)(q, k, v, rows_pos, rows_seg, kv_pos, kv_seg), "attn_core")
        h, normed = checkpointed(_residual_and_norm)(self, x, out, selection)
        return tag(h, "attn_out"), normed

    def feed_forward(self, h: Float[Array, "b t d"], normed=None, mlp=None) -> Float[Array, "b t d"]:
        """``h + mlp(post_attn_norm(h))``; ``normed`` reuses a computed norm, ``mlp`` replaces the
        module's MLP call (LeMo's channel-sparse backward)."""
        normed = self.post_attn_norm(h) if normed is None else normed
        return h + tag((mlp or self.mlp)(normed), "mlp_out")

    def __call__(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"],
                 segment_ids: Int[Array, "b t"] | None = None,
                 selection: Selection | None = None, kv_cache: Callable | None = None
                 ) -> Float[Array, "b t d"]:
        x = tag(x, "block_in")
        return self.feed_forward(*self.attend_and_norm(x, positions, segment_ids, selection,
                                                       kv_cache))


RESIDUAL_AXES = ("batch", "length", "act_embed")


def shard_residual(h: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
    """Residual-stream layout on a mesh: rows over the batch axes, the sequence over ``seq``, the
    model dimension whole (identity without a mesh)."""
    return constrain(h, RESIDUAL_AXES)


def shard_qkv(q, k, v):
    """Attention-input layout on a mesh: queries stay split over ``seq``; keys and values are
    gathered over it (every query shard needs every earlier key); heads split over ``tensor``."""
    return (constrain(q, ("batch", "length", "act_heads", None)),
            constrain(k, ("batch", None, "act_kv_heads", None)),
            constrain(v, ("batch", None, "act_kv_heads", None)))


def _normed_qkv(block: DecoderBlock, x, positions, selection):
    """q, k, v of ``input_norm(x)`` on the selected rows (all rows without a selection)."""
    if selection is not None:
        x = routing.gather(x, selection)  # the norm is per row: gather first, norm fewer rows
    return block.attn.project_qkv(block.input_norm(x), positions)


def _residual_and_norm(block: DecoderBlock, x, out, selection):
    """``h = x + o_proj(out)`` (scattered to the selected rows) and ``post_attn_norm(h)``."""
    a = block.attn.project_out(out)
    h = x + a if selection is None else routing.scatter_add(x, selection, a)
    return h, block.post_attn_norm(h)


_RECOVERY = contextvars.ContextVar("tokensparse_input_recovery", default=True)


@contextlib.contextmanager
def input_recovery(enabled: bool):
    """Let block-sparse attention sub-layers recover their input in the backward (see
    :func:`_recovering_attend`) only when ``enabled``. On by default where it pays: in
    :meth:`Llama.run_layers` with remat ``none``. Under any remat policy the layer loop switches it
    off: ``full`` would keep ``h`` beside the recomputation's own buffers (+3% temp at llama2-7b
    8K), ``dots`` would recompute the projections its policy saves (+12% FLOPs), and a
    names-based policy could not see the tags inside the custom VJP. It is read at trace time, so
    switch it before tracing (``jax.jit`` caches traces by function)."""
    token = _RECOVERY.set(enabled)
    try:
        yield
    finally:
        _RECOVERY.reset(token)


def _recovers(block: DecoderBlock, selection: Selection) -> bool:
    """Backward input recovery applies to block selections when no remat policy reads the
    sub-layer's tags (they would be hidden inside its custom VJP) and no RNG is drawn in it."""
    return (_RECOVERY.get() and selection.block_size > 1 and not tagging_enabled()
            and not jax.tree.leaves(nnx.state(block, nnx.RngState)))


def _recovering_attend(block: DecoderBlock, x, rows_pos, rows_seg, selection: Selection, core):
    """``attend_and_norm`` on a selection with LeMo's in-place add and backward input recovery (the paper's
    permutation-free movement): ``h = x + scatter(a)`` adds the attention output ``a`` at the kept rows of
    ``x``, which is dead afterwards (so XLA updates it in place, no copy); the backward keeps ``h`` (not
    ``x``), recovers the kept rows ``x_k = h_k − a`` and adds their gradient in place into ``∂h``.

    Saved: ``h``, the attention output and the core's own residuals (q, k, v, logsumexp); the norms
    and projections are recomputed, as in the plain path. Only perturbed parameters (e.g. LoRA's)
    are differentiated. Exact in real arithmetic; in floating point ``x_k`` is off by the rounding
    of ``x + a`` (half an ulp of ``h``), which perturbs the gradient through the input norm and the
    q/k/v projections at that level.
    """
    graphdef, state = nnx.split(block)
    leaves, treedef = jax.tree.flatten(state)
    n = len(leaves)
    perturbed: list[bool] = []  # per leaf, x last; recorded when the forward rule is traced

    def merged(params):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, params))

    def rows(indices, valid):
        return Selection(indices, valid, selection.shards, selection.block_size)

    def normed_qkv(params, x_k, rows_pos):
        return shard_qkv(*_normed_qkv(merged(params), x_k, rows_pos, None))

    def forward(params, x, rows_pos, rows_seg, indices, valid, *, residuals=True):
        sel = rows(indices, valid)
        q, k, v = normed_qkv(params, routing.gather(x, sel), rows_pos)
        def attend(q, k, v):
            return core(q, k, v, rows_pos, rows_seg, None, None)

        out, core_vjp = jax.vjp(attend, q, k, v) if residuals else (attend(q, k, v), None)
        h = routing.scatter_add(x, sel, merged(params).attn.project_out(out))
        return (h, merged(params).post_attn_norm(h)), (params, h, out, rows_pos, indices, valid,
                                                       core_vjp)

    def forward_rule(params, x, rows_pos, rows_seg, indices, valid):
        perturbed[:] = [p.perturbed for p in (*params, x)]
        def value(tree):
            return jax.tree.map(lambda p: p.value, tree)

        return forward(value(params), x.value, *map(value, (rows_pos, rows_seg, indices, valid)))

    def partial_vjp(fn, params, *args):
        """``fn(params, *args)`` and its VJP in the perturbed params and ``args``."""
        live = [i for i in range(n) if perturbed[i]]

        def of_live(live_params, *args):
            full = list(params)
            for i, p in zip(live, live_params, strict=True):
                full[i] = p
            return fn(full, *args)

        y, vjp = jax.vjp(of_live, [params[i] for i in live], *args)
        return y, vjp, live

    def backward(res, cotangents):
        params, h, out, rows_pos, indices, valid, core_vjp = res
        sel = rows(indices, valid)
        dh, dnormed = (None if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
                       for c in cotangents)
        d_params = [None] * n
        grads = []
        if dnormed is not None:
            _, vjp, live = partial_vjp(lambda p, h: merged(p).post_attn_norm(h), params, h)
            d_live, dh_norm = vjp(dnormed)
            grads.append((live, d_live))
            dh = dh_norm.astype(h.dtype) if dh is None else dh + dh_norm.astype(dh.dtype)
        if dh is None:
            return (d_params, None, None, None, None, None)
        a, vjp, live = partial_vjp(lambda p, o: merged(p).attn.project_out(o), params, out)
        d_live, dout = vjp(routing.gather(dh, sel).astype(a.dtype))
        grads.append((live, d_live))
        dq, dk, dv = core_vjp(dout)
        x_k = routing.gather(h, sel) - a.astype(h.dtype)
        _, vjp, live = partial_vjp(lambda p, x: normed_qkv(p, x, rows_pos), params, x_k)
        d_live, dx_k = vjp((dq, dk, dv))
        grads.append((live, d_live))
        for live, d_live in grads:
            for i, g in zip(live, d_live, strict=True):
                d_params[i] = g if d_params[i] is None else d_params[i] + g
        dx = routing.scatter_add(dh, sel, dx_k) if perturbed[n] else None
        return (d_params, dx, None, None, None, None)

    attend = jax.custom_vjp(lambda *args: forward(*args, residuals=False)[0])
    attend.defvjp(forward_rule, backward, symbolic_zeros=True)
    return attend(leaves, x, rows_pos, rows_seg, selection.indices, selection.valid)


def dense_layer(block: DecoderBlock, h, layer: Layer, selection: Selection | None):
    """The default layer function: the block itself, routed through ``selection``."""
    return block(h, layer.positions, layer.segment_ids, selection), None


class Llama(nnx.Module):
    """Decoder-only Llama: ``model(tokens, positions=None, segment_ids=None) -> logits [B, T, V]``.

    ``segment_ids`` confine attention to each packed document (negative ids mark padding).
    ``selections`` (one entry per layer, ``None`` for dense) routes each layer's attention through
    a token subset. ``attention_backend`` is passed to :func:`tokensparse.attention.attention`.
    ``remat`` (see :mod:`tokensparse.remat`) checkpoints each block; it changes memory, not values.
    ``layers`` is a :class:`~tokensparse.layer_stack.LayerStack` (groups of ``layer_groups``
    consecutive layers, stacked); ``scan_layers`` runs each run of identical layers under one
    ``lax.scan`` (False: a Python loop over the same per-layer function, for debugging).
    """

    def __init__(self, config: ModelConfig, *, attention_backend: str = "auto",
                 remat: str = "none", remat_names: tuple[str, ...] = ("qkv", "attn_core"),
                 layer_groups: Sequence[int] | None = None, scan_layers: bool = True,
                 rngs: nnx.Rngs):
        check_remat(remat)
        self.config = config
        self.remat = remat
        self.remat_names = tuple(remat_names)
        self.scan_layers = scan_layers
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.embed = Embed(config.vocab_size, config.d_model, std=config.init_std, rngs=rngs, **kw)
        self.layers = LayerStack([
            DecoderBlock(config, layer=i, attention_backend=attention_backend, rngs=rngs)
            for i in range(config.n_layers)
        ], layer_groups)
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_eps, **kw)
        self.lm_head = nnx.data(None) if config.tie_embeddings else Linear(
            config.d_model, config.vocab_size, std=config.init_std, axes=("embed", "vocab"),
            rngs=rngs, **kw)

    def hidden_states(
        self,
        tokens: Int[Array, "b t"],
        positions: Int[Array, "b t"] | None = None,
        segment_ids: Int[Array, "b t"] | None = None,
        *,
        selections: Sequence[Selection | None] | None = None,
        layer_fn: Callable | None = None,
        router: Callable | None = None,
        kinds: Sequence[Hashable] | None = None,
        inputs: Sequence[Any] | None = None,
        carry: tuple = (),
        remat_for: Callable[[Hashable], Callable | None] | None = None,
    ):
        """Final-normed hidden states (before the LM head): embed → :meth:`run_layers` → norm.

        ``selections`` (one per layer, None for dense) fixes each layer's token subset. The other
        keywords are :meth:`run_layers`' hooks; with a ``layer_fn`` that returns per-layer outputs,
        or a non-empty ``carry`` (extra loop state beside the residual stream), the result is
        ``(hidden, carry, outputs)`` instead of the hidden states alone.
        """
        positions = default_positions(tokens) if positions is None else positions
        if selections is not None:
            if len(selections) != len(self.layers):
                raise ValueError(f"selections has {len(selections)} entries; the model has "
                                 f"{len(self.layers)} layers (use None for dense layers).")
            if router is not None or inputs is not None:
                raise ValueError("give selections, or a router and inputs, not both.")
            kinds = tuple(s is not None for s in selections) if kinds is None else kinds
            inputs = list(selections)
            router = _given_selection
        h = shard_residual(self.embed(tokens))
        state = (h, *carry) if carry else h
        state, outputs = self.run_layers(state, positions, segment_ids, layer_fn=layer_fn,
                                         router=router, kinds=kinds, inputs=inputs,
                                         remat_for=remat_for)
        hidden = self.final_norm(residual(state))
        if carry or outputs is not None:
            return hidden, state[1:] if carry else (), outputs
        return hidden

    def run_layers(self, carry, positions, segment_ids=None, *, layer_fn: Callable | None = None,
                   router: Callable | None = None, kinds: Sequence[Hashable] | None = None,
                   inputs: Sequence[Any] | None = None, start: int = 0, stop: int | None = None,
                   remat_for: Callable[[Hashable], Callable | None] | None = None):
        """The model's one loop over decoder layers ``start..stop-1``: ``(carry, outputs)``.

        ``carry`` is the residual stream ``h`` [B, T, D] or ``(h, *extra)`` (e.g. KV caches).
        Per layer: ``selection = router(block, h, layer)`` (None without a router; it runs outside
        any remat region, so recomputation never re-selects), then ``carry, y = layer_fn(block,
        carry, layer, selection)`` (default :func:`dense_layer`), rematerialised per ``remat``.
        ``layer`` is a :class:`Layer`: index, positions, segment ids, the layer's entry of
        ``inputs`` (one per model layer) and its ``kinds`` entry. Consecutive layers of one kind
        run under one ``lax.scan`` (their ``inputs`` entries must share a structure, and so must
        their ``y``); ``outputs`` lists the ``y`` of layers ``start..stop-1`` (None when all are).
        ``remat_for(kind)`` gives each kind of layer its own ``jax.checkpoint`` policy (None: save
        nothing), replacing the model's ``remat`` (e.g. LeMo's per-layer offload budgets).
        """
        body = _layer_body(self.rematerialised(layer_fn or dense_layer, remat_for), router)
        recover = _RECOVERY.get() and self.remat == "none" and remat_for is None
        with tagging(uses_names(self.remat) or remat_for is not None), input_recovery(recover):
            return layer_loop.run(self.layers, body, carry, positions, segment_ids, kinds=kinds,
                                  inputs=inputs, start=start, stop=stop, scan=self.scan_layers)

    def rematerialised(self, layer_fn, remat_for: Callable[[Hashable], Callable | None] | None = None):
        """``layer_fn(block, carry, layer, selection)`` checkpointed per ``self.remat`` (unchanged
        for ``"none"``), or with the policy ``remat_for(layer.kind)`` when given."""
        if remat_for is not None:
            def by_kind(block, carry, layer: Layer, selection):
                return checkpointed(layer_fn, remat_for(layer.kind))(block, carry, layer, selection)
            return by_kind
        if self.remat == "none":
            return layer_fn
        return checkpointed(layer_fn, remat_policy(self.remat, self.remat_names))

    def head_weight(self) -> Float[Array, "d v"]:
        """The LM head matrix in the compute dtype (the embedding, transposed, when tied)."""
        dtype = self.config.compute_dtype
        if self.lm_head is None:
            return gathered_for_use(self.embed.embedding).astype(dtype).T
        return gathered_for_use(self.lm_head.kernel).astype(dtype)

    def head(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """LM head: hidden states → vocabulary logits (tied to the embedding when configured)."""
        return jnp.dot(h.astype(self.config.compute_dtype), self.head_weight())

    def __call__(self, tokens, positions=None, segment_ids=None, *, selections=None):
        return self.head(self.hidden_states(tokens, positions, segment_ids, selections=selections))


def _given_selection(block, h, layer: Layer):
    """The router of ``hidden_states(selections=...)``: the layer's fixed selection."""
    return layer.inputs


def _layer_body(layer_fn, router):
    """One layer: route (outside remat), run ``layer_fn``, keep the residual stream's layout."""
    def body(block, carry, layer: Layer):
        selection = None if router is None else router(block, residual(carry), layer)
        carry, y = layer_fn(block, carry, layer, selection)
        return with_residual(carry, shard_residual(residual(carry))), y
    return body


def default_positions(tokens: Int[Array, "b t"]) -> Int[Array, "b t"]:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
