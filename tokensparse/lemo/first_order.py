"""First-order token importance inside the LeMo sparse forward: the learned selector's target.

A sparse layer with kept-token mask ``m`` computes (the spec's masked reference, written out)::

    p_ij = w_j · exp(l_ij) / Σ_k w_k · exp(l_ik)      (causal; w_j = m_j + δk_j, the key weight)
    h'_i = h_i + (m_i + δq_i) · a_i                    (a_i = o_proj(Σ_j p_ij v_j), the update)

which at δ = 0 is exactly the layer of the LeMo forward with ``LeMoConfig.eliminated="pass"`` (kept
tokens attend among themselves, the others pass through; the default fill of eliminated blocks,
:mod:`tokensparse.lemo.fill`, is not modelled here). The derivative of the loss with respect to
``δq_t + δk_t`` is the first-order change of the loss when token t's membership flips: for a kept
token, minus the loss it would add if eliminated, both as a query (its own update ``g_t · a_t``, g =
dLoss/dh') and as a key (what the queries that read it lose); for an eliminated one, the loss it
would remove if kept. So

    importance_t = −(dL/dδq_t + dL/dδk_t)

ranks tokens by what keeping them is worth, on the inputs and selections of the sparse forward
itself (earlier layers already sparse), and summed over a block it is the first-order effect of
keeping the block. Measured on SmolLM2 as fixed selections it beat the query side alone, random and
the exact ``attention_ratio`` rule; the selector (:mod:`tokensparse.lemo.
learned_selector`) learns to predict it from the layer input alone.

The attention here is explicit ([T, T] logits per head, fp32): a training-data tool for short
windows, not a training path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tokensparse import routing


def kept_mask(selection: routing.Selection | None, shape: tuple[int, int]) -> Float[Array, "b t"]:
    """1.0 at the tokens ``selection`` keeps (every token without one), else 0.0."""
    if selection is None:
        return jnp.ones(shape, jnp.float32)
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, jnp.float32).at[rows, selection.indices].max(
        selection.valid.astype(jnp.float32))


def soft_masked_attend(block, h: Float[Array, "b t d"], positions, keep: Float[Array, "b t"],
                       dq: Float[Array, "b t"], dk: Float[Array, "b t"]) -> Float[Array, "b t d"]:
    """``h + (keep + dq) · a`` with ``a`` the causal attention whose key ``j`` has weight
    ``keep_j + dk_j`` (module docstring; unpacked rows, no segment ids)."""
    u = block.input_norm(h)
    q, k, v = block.attn.project_qkv(u, positions)
    b, t, n_heads, d = q.shape
    n_kv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, n_kv, n_heads // n_kv, d)
    logits = jnp.einsum("bikgd,bjkd->bkgij", qg, k.astype(jnp.float32)) / math.sqrt(d)
    causal = (positions[:, None, :] <= positions[:, :, None])[:, None, None]
    logits = jnp.where(causal, logits, -jnp.inf)
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits) * (keep + dk)[:, None, None, None, :]
    p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bkgij,bjkd->bikgd", p, v.astype(jnp.float32)).reshape(b, t, n_heads, d)
    a = block.attn.project_out(out.astype(u.dtype)).astype(jnp.float32)
    return (h.astype(jnp.float32) + (keep + dq)[..., None] * a).astype(h.dtype)


def importance(model, tokens, router=None, kinds=None, start: int = 0
               ) -> tuple[Float[Array, "l b t"], tuple]:
    """Per layer and token, ``−(dL/dδq + dL/dδk)`` of the forward whose sparse layers keep what
    ``router`` selects (a :meth:`~tokensparse.llama.Llama.run_layers` router with its ``kinds``;
    None: the dense forward), and per layer from ``start`` on ``(stop_gradient(normed input) bf16,
    log rms(h), kept mask)``. Layers before ``start`` run without a backward (their importance is
    returned as zeros)."""
    from tokensparse import train
    from tokensparse.lemo.learned_selector import features
    from tokensparse.llama import default_positions

    n_layers = len(model.layers)
    b, t = tokens.shape
    positions = default_positions(tokens)
    targets, weights = train.next_token_targets(tokens, None)

    def loss(deltas):
        dq, dk = deltas

        def layer_fn(block, h, layer, selection):
            keep = kept_mask(selection, (b, t))
            h2 = soft_masked_attend(block, h, layer.positions, keep, dq[layer.index],
                                    dk[layer.index])
            u = jax.lax.stop_gradient(block.input_norm(h))
            out = (u.astype(jnp.bfloat16), features(u, jax.lax.stop_gradient(h))[1], keep)
            return block.feed_forward(h2), out

        h, _ = model.run_layers(model.embed(tokens), positions, layer_fn=layer_fn, router=router,
                                kinds=kinds, stop=start)
        h, outputs = model.run_layers(jax.lax.stop_gradient(h), positions, layer_fn=layer_fn,
                                      router=router, kinds=kinds, start=start)
        logits = model.head(model.final_norm(h))
        total = train.cross_entropy_sum(logits, targets, weights)
        return total / jnp.maximum(weights.sum(), 1.0), outputs

    zeros = jnp.zeros((n_layers, b, t), jnp.float32)
    (_, outputs), (gq, gk) = jax.value_and_grad(loss, has_aux=True)((zeros, zeros))
    return -(gq + gk), outputs


def normalised(x: Float[Array, "... t"], block_size: int) -> Float[Array, "... t"]:
    """``x`` divided by its standard deviation over each row's tokens after block 0 (the block
    LeMo always keeps, whose attention-sink token dwarfs the rest): selection ranks within a row,
    so only the scale per (layer, window) is removed."""
    rest = x[..., block_size:]
    return x / jnp.maximum(jnp.std(rest, axis=-1, keepdims=True), 1e-12)
