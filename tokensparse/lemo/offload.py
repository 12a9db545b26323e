"""Jenga's sparsity-sensitive activation offload (a paper extension), as per-layer remat policies.

With ``remat="names"`` a decoder layer keeps its ``remat_names`` tensors (by default q, k, v and the
attention output) for the backward and recomputes the rest. Offload moves some of them to host
memory (``pinned_host``) instead, paying device↔host copies that a GPU or TPU overlaps with
compute. How much a layer can move is a *budget*: the bytes whose transfer hides behind the layer's
work. One uniform budget per layer fits token elimination badly: a sparse layer keeping ρ of its
tokens has ρ-sized attention activations, so it cannot use a dense layer's budget, while the dense
layers could move more. Jenga's sparsity-sensitive schedule gives each layer a budget that follows
its sparsity.

``LeMoConfig.offload``:
- ``uniform``: every layer gets ``offload_budget_mib`` (the baseline schedule);
- ``sparsity``: the same total (``offload_budget_mib`` × layers), split in proportion to each layer's
  candidate bytes (:func:`named_bytes` of its ``remat_names``, which shrink with its keep ratio): every
  layer then offloads about the same fraction of what it keeps.

Within its budget a layer offloads whole named tensors, in ``remat_names`` order
(:func:`tokensparse.remat.split_by_budget`); the rest stays on device. Layers of one kind share one
policy, so the plan is a ``remat_for(kind)`` hook of :meth:`tokensparse.llama.Llama.run_layers`.
Offload saves no FLOPs (nothing is recomputed that ``remat="names"`` would not recompute either);
on a CPU host memory is device memory, so it changes neither values nor compiled bytes there: its
memory effect shows only on an accelerator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax.numpy as jnp

from tokensparse import routing
from tokensparse.config import LeMoConfig, ModelConfig
from tokensparse.remat import CHECKPOINT_NAMES, offload_policy, split_by_budget, uses_names

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class LayerOffload:
    """One layer's share of the plan: its budget and which named tensors go to host or stay."""

    keep_ratio: float
    budget_bytes: float
    offloaded: tuple[str, ...]
    saved: tuple[str, ...]

    def policy(self) -> Callable[..., bool]:
        return offload_policy(saved=self.saved, offloaded=self.offloaded)


def kept_rows(seq_len: int, keep_ratio: float, block_size: int) -> int:
    """Rows a layer's attention runs on: all of them when dense, else its kept blocks' tokens."""
    if keep_ratio >= 1.0:
        return seq_len
    n_blocks = -(-seq_len // block_size)
    return routing.capacity(n_blocks, keep_ratio, rounding="floor") * block_size


def named_bytes(config: ModelConfig, batch: int, seq_len: int, keep_ratio: float,
                block_size: int) -> dict[str, int]:
    """Bytes of each tensor a layer tags for remat (``CHECKPOINT_NAMES``), in the compute dtype:
    the attention's (``qkv``, ``attn_core``) scale with the kept rows, the residual stream's don't."""
    item = jnp.dtype(config.compute_dtype).itemsize
    rows = batch * kept_rows(seq_len, keep_ratio, block_size)
    stream = batch * seq_len * config.d_model * item
    sizes = {"block_in": stream, "attn_out": stream, "mlp_out": stream,
             "qkv": rows * (config.n_heads + 2 * config.n_kv_heads) * config.head_dim * item,
             "attn_core": rows * config.n_heads * config.head_dim * item}
    assert set(sizes) == set(CHECKPOINT_NAMES)
    return sizes


def layer_budgets(mode: str, budget_bytes: float, candidate_bytes: Sequence[float]
                  ) -> list[float]:
    """Per-layer budgets: ``budget_bytes`` each (``uniform``), or their total split in proportion to
    ``candidate_bytes`` (``sparsity``)."""
    n = len(candidate_bytes)
    if mode == "uniform":
        return [float(budget_bytes)] * n
    if mode != "sparsity":
        raise ValueError(f"offload mode {mode!r} has no budgets; use 'uniform' or 'sparsity'.")
    total = float(sum(candidate_bytes))
    return [budget_bytes * n * c / total if total else 0.0 for c in candidate_bytes]


def offload_plan(config: ModelConfig, lemo: LeMoConfig, ratios: Sequence[float],
                 remat_names: Sequence[str], batch: int, seq_len: int) -> list[LayerOffload]:
    """Each layer's :class:`LayerOffload` under ``lemo.offload`` for a [batch, seq_len] step."""
    sizes = [named_bytes(config, batch, seq_len, r, lemo.block_size) for r in ratios]
    candidates = [sum(s[n] for n in remat_names) for s in sizes]
    budgets = layer_budgets(lemo.offload, lemo.offload_budget_mib * MIB, candidates)
    return [LayerOffload(r, b, *split_by_budget(remat_names, s, b))
            for r, b, s in zip(ratios, budgets, sizes, strict=True)]


def remat_for(plan: Sequence[LayerOffload], kinds: Sequence[Hashable]
              ) -> Callable[[Hashable], Callable[..., bool]]:
    """The plan as :meth:`~tokensparse.llama.Llama.run_layers`' ``remat_for``: kind → policy."""
    by_kind: dict[Hashable, LayerOffload] = {}
    for kind, layer in zip(kinds, plan, strict=True):
        if by_kind.setdefault(kind, layer) != layer:
            raise ValueError(f"layers of kind {kind!r} have different offload plans; the layer "
                             "loop applies one policy per kind.")
    policies = {kind: layer.policy() for kind, layer in by_kind.items()}
    return policies.__getitem__


def model_remat_for(model, lemo: LeMoConfig, ratios: Sequence[float], kinds: Sequence[Hashable],
                    batch: int, seq_len: int):
    """``remat_for`` of ``lemo.offload`` on ``model`` (None for ``offload="none"``)."""
    if lemo.offload == "none":
        return None
    if not uses_names(model.remat):
        raise ValueError(f"LeMoConfig.offload={lemo.offload!r} moves the model's remat_names to host "
                         f"memory: build the model with remat='names' or 'offload' (it has "
                         f"{model.remat!r}).")
    plan = offload_plan(model.config, lemo, ratios, model.remat_names, batch, seq_len)
    return remat_for(plan, kinds)
