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
the same: it computes the same values and saves nothing. :func:`offload_policy` splits the names
between device and host, and :func:`split_by_budget` picks the host share from a byte budget: the
per-layer budgets of LeMo's sparsity-aware offload (:mod:`tokensparse.lemo.offload`) are built on
them, one policy per kind of layer (``Llama.run_layers(remat_for=...)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

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
        return offload_policy(saved=(), offloaded=names)
    return jax.checkpoint_policies.save_only_these_names(*names)


def offload_policy(saved: Sequence[str], offloaded: Sequence[str]) -> Callable[..., bool]:
    """Keep the tagged tensors ``saved`` in device memory and ``offloaded`` in host memory
    (``pinned_host``) until the backward; recompute everything else."""
    unknown = [n for n in (*saved, *offloaded) if n not in CHECKPOINT_NAMES]
    if unknown:
        raise ValueError(f"remat names {unknown} are not tagged in the model; use {CHECKPOINT_NAMES}.")
    if set(saved) & set(offloaded):
        raise ValueError(f"remat names {sorted(set(saved) & set(offloaded))} are both saved and "
                         "offloaded; name each once.")
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
        offload_src="device", offload_dst="pinned_host")


def split_by_budget(names: Sequence[str], sizes: Mapping[str, float], budget: float
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(offloaded, saved)``: the subset of ``names`` with the most ``sizes`` bytes that fits in
    ``budget`` goes to host (ties: the earlier names), the rest stays on device. Whole tensors only:
    a policy offloads a named tensor or does not."""
    best, best_bytes = (), 0.0
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            total = sum(sizes[n] for n in subset)
            if best_bytes < total <= budget:
                best, best_bytes = subset, total
    return best, tuple(n for n in names if n not in best)


_TAGGING = contextvars.ContextVar("tokensparse_remat_tagging", default=True)


def tag(x, name: str):
    """``checkpoint_name(x, name)``, unless tags are switched off (:func:`tagging`).

    A tag is an identity op that only a names-based policy reads; elsewhere it costs nothing
    unrolled, but under a scan over layers a tagged tensor and its untagged source (e.g. attention's
    output, which its kernel also saves) become two saved values, stored twice."""
    return checkpoint_name(x, name) if _TAGGING.get() else x


@contextlib.contextmanager
def tagging(enabled: bool):
    """Tag activations (:func:`tag`) inside the block only when ``enabled``."""
    token = _TAGGING.set(enabled)
    try:
        yield
    finally:
        _TAGGING.reset(token)


def tagging_enabled() -> bool:
    """Whether activations are tagged here (:func:`tagging`): a names-based policy may read them."""
    return _TAGGING.get()


def uses_names(name: str) -> bool:
    """Whether remat policy ``name`` reads activation tags."""
    return name in ("names", "offload")


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
