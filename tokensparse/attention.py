"""Multi-head attention whose mask comes from positions and segment ids, with pluggable backends.

Masks are never built from array indices: the rule (``kernels_pallas.reference.visible``, re-exported
here with :func:`attention_mask` and :func:`reference_attention`) is that a query at original position
p sees a key at position p' iff p' <= p (when causal) and both carry the same non-negative segment
id. This one rule covers packed documents, compacted token subsets (LeMo, SUBLLM) and padding
(segment id < 0 sees and is seen by nothing). A query row with no visible key returns zeros.

Backends (kind ``"attention"`` of :mod:`tokensparse.backends`): ``"reference"`` (plain einsum, fp32
softmax: the definition every kernel is tested against), ``"xla"`` (``jax.nn.dot_product_attention``),
``"chunked"`` (online softmax over key chunks in plain JAX: flash-like memory everywhere) and
``"pallas"`` (the kernels of ``kernels_pallas``). ``"auto"`` picks the best backend that supports the
platform and shapes, falling back to ``"xla"``; a backend named explicitly that cannot run raises.
:func:`resolve` and :func:`model_backend` say which backend runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.reference import attention_mask, reference_attention
from kernels_pallas.register import pallas_attention
from kernels_pallas.register import supports as pallas_supports
from tokensparse import backends as _registry
from tokensparse.backends import Backend
from tokensparse.chunked_attention import chunked_attention

__all__ = ["Backend", "attention", "attention_mask", "backends", "model_backend",
           "reference_attention", "register_backend", "resolve", "resolve_backend", "xla_attention"]

KIND = "attention"
Positions = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]


def _check_shapes(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,Tq,H,D], k/v [B,Tk,Hkv,D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim.")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}).")


def xla_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                  causal=True, scale=None):
    """``jax.nn.dot_product_attention`` with an explicit position/segment mask; empty rows zeroed."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation="xla")
    visible = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(visible, out, jnp.zeros((), out.dtype))


_registry.define(KIND, fallback="xla")
_registry.register(KIND, "reference", Backend(reference_attention, priority=-1))
_registry.register(KIND, "xla", Backend(xla_attention, priority=0))
# O(T·chunk) memory on any platform; pick it explicitly for long contexts without a kernel.
_registry.register(KIND, "chunked", Backend(chunked_attention, priority=-1))
# The kernels: a GPU or TPU (or TOKENSPARSE_PALLAS_INTERPRET), else they decline.
_registry.register(KIND, "pallas", Backend(pallas_attention, supports=pallas_supports, priority=10))


def register_backend(name: str, backend: Backend) -> None:
    """Make ``backend`` selectable as ``attention(..., backend=name)`` (and by ``"auto"``).

    ``backend.fn`` has the signature of :func:`reference_attention`; ``backend.supports`` takes
    ``(q, k, v, *, causal)``.
    """
    _registry.register(KIND, name, backend)


def backends() -> list[str]:
    """The registered attention backend names."""
    return _registry.names(KIND)


def resolve(name: str, q, k, v, *, causal: bool = True) -> str:
    """The attention backend that ``attention(q, k, v, causal=causal, backend=name)`` runs (q, k, v
    may be ``jax.ShapeDtypeStruct`` s); raises ``ValueError`` for a named backend that cannot."""
    return _registry.resolve(KIND, name, q, k, v, causal=causal)


def resolve_backend(name: str, q, k, v, *, causal: bool = True) -> Backend:
    """The :class:`Backend` of :func:`resolve`."""
    return _registry.get(KIND, resolve(name, q, k, v, causal=causal))


def model_backend(name: str, config, *, seq_len: int, batch: int = 1) -> str:
    """:func:`resolve` for the causal self-attention of a model with ``config`` (a ModelConfig)."""
    q = jax.ShapeDtypeStruct((batch, seq_len, config.n_heads, config.head_dim), config.compute_dtype)
    kv = jax.ShapeDtypeStruct((batch, seq_len, config.n_kv_heads, config.head_dim),
                              config.compute_dtype)
    return resolve(name, q, kv, kv, causal=True)


def attention(
    q: Float[Array, "b tq h d"],
    k: Float[Array, "b tk hkv d"],
    v: Float[Array, "b tk hkv d"],
    *,
    q_positions: Positions,
    kv_positions: Positions,
    q_segment_ids: SegmentIds | None = None,
    kv_segment_ids: SegmentIds | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Float[Array, "b tq h d"]:
    """Grouped-query attention (H % Hkv == 0) masked by positions and segment ids; see module doc."""
    _check_shapes(q, k, v)
    impl = resolve_backend(backend, q, k, v, causal=causal)
    return impl.fn(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                   scale=scale)
