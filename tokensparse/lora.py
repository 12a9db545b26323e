"""LoRA adapters on a Llama model: attach, train only them, merge for export.

Adapters live in :class:`tokensparse.llama.Linear`'s ``adapter`` slot, so the base model code is
unchanged. Their parameters are :class:`LoRAParam`, a subclass of Flax's own ``nnx.LoRAParam``
(itself an ``nnx.Param``), so Flax's filters select them: ``wrt=nnx.LoRAParam`` (or this module's
``LoRAParam``, or :data:`TRAINABLE`) in ``nnx.Optimizer`` / ``nnx.DiffState`` trains only them.

Orientation (what :func:`merge_lora` folds and :mod:`tokensparse.export` writes): a kernel is
``[in, out]`` and the adapter adds ``scale * x @ a @ b`` with ``a: [in, r]``, ``b: [r, out]``,
``scale = alpha / r``; so the merged kernel is ``W + scale * a @ b``. PEFT's ``lora_A.weight`` is
``a.T`` (``[r, in]``) and ``lora_B.weight`` is ``b.T`` (``[out, r]``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tokensparse.config import LoRAConfig
from tokensparse.llama import Linear, Llama, gathered_for_use


class LoRAParam(nnx.LoRAParam):
    """A trainable low-rank adapter weight (an ``nnx.LoRAParam``, hence also an ``nnx.Param``).

    A subclass rather than ``nnx.LoRAParam`` itself so that ``wrt=tokensparse.lora.LoRAParam``
    selects exactly this project's adapters, while Flax's filter selects them too. Checkpoints do not
    record the variable class (Orbax stores ``.../adapter/a/value``), so runs saved before it became
    a subclass restore unchanged."""


TRAINABLE = LoRAParam

_TARGET_PATHS = {
    "q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


class LoRA(nnx.Module):
    """``scale * dropout(x) @ a @ b``; ``b`` starts at zero so an untrained adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, *,
                 param_dtype=jnp.float32, dtype=jnp.float32,
                 axes: tuple[str | None, str | None] = (None, None), rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)  # Kaiming-uniform(a=sqrt(5)), as PEFT initialises A.
        in_axis, out_axis = axes
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, config.rank),
                                              jnp.float32, -bound, bound).astype(param_dtype),
                           logical_axes=(in_axis, None))
        self.b = LoRAParam(jnp.zeros((config.rank, out_features), param_dtype),
                           logical_axes=(None, out_axis))
        self.scale = config.scale
        self.dtype = dtype
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return jnp.dot(jnp.dot(x, gathered_for_use(self.a).astype(self.dtype)),
                       gathered_for_use(self.b).astype(self.dtype)) * self.scale

    def delta(self) -> jax.Array:
        """The dense weight update ``scale * a @ b`` in ``[in, out]`` layout."""
        return self.scale * jnp.dot(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32))


def target_linears(blocks, targets) -> list[tuple[str, Linear]]:
    """(path, Linear) for every targeted projection of every block in ``blocks``."""
    out = []
    for i, block in enumerate(blocks):
        for name in targets:
            part, proj = _TARGET_PATHS[name]
            out.append((f"layers.{i}.{part}.{proj}", getattr(getattr(block, part), proj)))
    return out


def add_lora(model: Llama, config: LoRAConfig = LoRAConfig(), *, rngs: nnx.Rngs) -> Llama:
    """Attach fresh adapters to ``config.targets`` in every layer (in place; returns ``model``)."""
    with model.layers.editing() as layers:
        for path, linear in target_linears(layers, config.targets):
            if linear.adapter is not None:
                raise ValueError(f"{path} already has an adapter; merge_lora() or build a fresh "
                                 "model.")
            d_in, d_out = linear.kernel.shape
            linear.adapter = LoRA(d_in, d_out, config, param_dtype=jnp.float32, dtype=linear.dtype,
                                  axes=linear.kernel.get_metadata().get("logical_axes",
                                                                        (None, None)),
                                  rngs=rngs)
    return model


def has_lora(model: Llama) -> bool:
    # Every layer of a stack has the same structure: the first layer of each group tells.
    return any(isinstance(linear.adapter, LoRA)
               for _, linear in target_linears(model.layers.groups, tuple(_TARGET_PATHS)))


def lora_state(model: Llama) -> nnx.State:
    """Only the adapter parameters: what a LoRA checkpoint saves."""
    return nnx.state(model, LoRAParam)


def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its base kernel and remove it (in place), e.g. before HF export."""
    with model.layers.editing() as layers:
        for _, linear in target_linears(layers, tuple(_TARGET_PATHS)):
            if isinstance(linear.adapter, LoRA):
                kernel = linear.kernel[...]
                linear.kernel[...] = (kernel.astype(jnp.float32) + linear.adapter.delta()).astype(
                    kernel.dtype)
                linear.adapter = None
    return model
