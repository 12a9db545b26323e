"""Rematerialisation (activation checkpointing) policies by name, applied per decoder block.

``none`` saves every activation; ``full`` saves only block inputs and recomputes the rest; ``dots``
saves matmul outputs without batch dimensions (recomputes elementwise work and attention);
``names`` saves only the tensors tagged with ``checkpoint_name`` (``block_in``, ``attn_out``,
``mlp_out``) listed in ``names``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

REMAT_POLICIES = ("none", "full", "dots", "names")
CHECKPOINT_NAMES = ("block_in", "attn_out", "mlp_out")


def remat_policy(name: str, names: tuple[str, ...] = ("attn_out", "mlp_out")
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
    return jax.checkpoint_policies.save_only_these_names(*names)


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not supported; use one of {REMAT_POLICIES}.")
