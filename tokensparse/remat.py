"""Rematerialisation (activation checkpointing) policies by name, applied per decoder block.

``none`` saves every activation; ``full`` saves only block inputs and recomputes the rest; ``dots``
saves matmul outputs without batch dimensions (recomputes elementwise work and attention);
``names`` saves only the tensors tagged with ``checkpoint_name`` listed in ``names``: ``block_in``
(the block input), ``qkv`` (q, k after RoPE and v), ``attn_core`` (the attention output before the
output projection), ``attn_out`` (the residual stream after attention) and ``mlp_out`` (the MLP's
output). The default, ``("qkv", "attn_core")``, keeps the attention inputs and output so that only
the norms, projections and MLP are recomputed. This block's backward needs neither ``attn_out`` nor
``mlp_out``, so saving them only costs memory; they are there for callers' own checkpoints.

``offload`` keeps the ``names`` tensors too, but moves them to host memory (``pinned_host``) until
the backward needs them: device memory then holds only block inputs, at the cost of device↔host
copies (worth it on GPU/TPU when the copies overlap compute). On CPU, host and device memory are
the same: it computes the same values and saves nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots", "names", "offload")
CHECKPOINT_NAMES = ("block_in", "qkv", "attn_core", "attn_out", "mlp_out")


def remat_policy(name: str, names: tuple[str, ...] = ("qkv", "attn_core")
                 ) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy for ``name`` (None means: save nothing, recompute all)."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat={name!r} has no policy; use one of {REMAT_POLICIES[1:]}.")
    if name == "full":
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    unknown = [n for n in names if n not in CHECKPOINT_NAMES]
    if unknown:
        raise ValueError(f"remat names {unknown} are not tagged in the model; use {CHECKPOINT_NAMES}.")
    if name == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
            offload_src="device", offload_dst="pinned_host")
    return jax.checkpoint_policies.save_only_these_names(*names)


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not supported; use one of {REMAT_POLICIES}.")


def checkpointed(fn: Callable, policy: Callable[..., bool] | None = None, *, prevent_cse: bool = True
                 ) -> Callable:
    """``fn(module, *args)`` under ``jax.checkpoint`` with ``policy``, usable inside plain JAX
    transforms (``jax.grad`` over ``nnx.merge``) as well as NNX ones.

    The module is split into its state, merged again inside the checkpointed function, and any RNG
    state it advanced (LoRA dropout) is written back, so randomness is consumed exactly as without
    the checkpoint, and the recomputation in the backward replays the same random draws.
    """

    def wrapped(module, *args):
        graphdef, state = nnx.split(module)

        def pure(state, *args):
            inner = nnx.merge(graphdef, state)
            return fn(inner, *args), nnx.state(inner, nnx.RngState)

        out, rng_state = jax.checkpoint(pure, policy=policy, prevent_cse=prevent_cse)(state, *args)
        nnx.update(module, rng_state)
        return out

    return wrapped
