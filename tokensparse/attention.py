"""Multi-head attention whose mask comes from positions and segment ids, with pluggable backends.

Masks are never built from array indices: a query at original position p sees a key at position p'
iff p' <= p (when causal) and both carry the same non-negative segment id. This one rule covers
packed documents, compacted token subsets (LeMo, SUBLLM) and padding (segment id < 0 sees and is seen
by nothing). A query row with no visible key returns zeros.

Backends: ``"reference"`` (plain einsum, fp32 softmax: the definition every kernel is tested
against), ``"xla"`` (``jax.nn.dot_product_attention``), ``"chunked"`` (online softmax over key chunks
in plain JAX: flash-like memory everywhere), and whatever ``kernels_pallas`` registers
(``"pallas"``). ``"auto"`` picks the best registered backend that supports the platform and shapes,
falling back to ``"xla"``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokensparse.chunked_attention import chunked_attention

Positions = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]


def _default_segments(positions: Positions, segment_ids: SegmentIds | None) -> SegmentIds:
    return jnp.zeros(positions.shape, jnp.int32) if segment_ids is None else segment_ids


def attention_mask(
    q_positions: Positions,
    kv_positions: Positions,
    q_segment_ids: SegmentIds | None = None,
    kv_segment_ids: SegmentIds | None = None,
    *,
    causal: bool = True,
) -> Bool[Array, "b tq tk"]:
    """Visibility of each key to each query, from positions and segment ids only."""
    q_seg = _default_segments(q_positions, q_segment_ids)
    kv_seg = _default_segments(kv_positions, kv_segment_ids)
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
    mask &= kv_seg[:, None, :] >= 0
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


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


def reference_attention(
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
) -> Float[Array, "b tq h d"]:
    """Dense attention in fp32: the definition every other backend is tested against."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, tq, hkv, h // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal)[:, None, None]
    row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Mask before exp: a large masked logit must not overflow (inf * 0 = NaN in the gradient).
    weights = jnp.exp(jnp.where(mask, logits - row_max, -jnp.inf))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, tq, h, d).astype(q.dtype)


def xla_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                  causal=True, scale=None):
    """``jax.nn.dot_product_attention`` with an explicit position/segment mask; empty rows zeroed."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation="xla")
    visible = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(visible, out, jnp.zeros((), out.dtype))


@dataclasses.dataclass(frozen=True)
class Backend:
    """An attention implementation: ``fn`` has the signature of :func:`reference_attention`.

    ``supports(q, k, v, causal=...)`` returns None when the backend can run these inputs on the current
    platform, or a short reason why not (which the dispatcher reports once before falling back).
    ``priority`` orders candidates for ``backend="auto"`` (higher first).
    """

    fn: Callable[..., Array]
    supports: Callable[..., str | None] = lambda *args, **kwargs: None
    priority: int = 0


_BACKENDS: dict[str, Backend] = {
    "reference": Backend(reference_attention, priority=-1),
    "xla": Backend(xla_attention, priority=0),
    # O(T·chunk) memory on any platform; pick it explicitly for long contexts without a kernel.
    "chunked": Backend(chunked_attention, priority=-1),
}
_WARNED: set[tuple[str, str]] = set()


def register_backend(name: str, backend: Backend) -> None:
    """Make ``backend`` selectable as ``attention(..., backend=name)`` (and by ``"auto"``)."""
    _BACKENDS[name] = backend


def backends() -> list[str]:
    return sorted(_BACKENDS)


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _WARNED:
        _WARNED.add((name, reason))
        warnings.warn(f"attention backend {name!r} unavailable ({reason}); falling back to 'xla'.",
                      stacklevel=3)


def resolve_backend(name: str, q: Array, k: Array, v: Array, *, causal: bool) -> Backend:
    """The backend that will run these inputs: the requested one, or a fallback with a warning."""
    if name == "auto":
        for candidate in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
            if candidate.priority > 0 and candidate.supports(q, k, v, causal=causal) is None:
                return candidate
        return _BACKENDS["xla"]
    if name not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; registered: {backends()}.")
    backend = _BACKENDS[name]
    reason = backend.supports(q, k, v, causal=causal)
    if reason is not None:
        _warn_once(name, reason)
        return _BACKENDS["xla"]
    return backend


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


def _register_pallas() -> None:
    """Adds the Pallas kernels as backend ``"pallas"``; they decline where they cannot run."""
    try:
        from kernels_pallas.register import pallas_attention, supports
    except ImportError:  # a build without the kernels package
        return
    register_backend("pallas", Backend(pallas_attention, supports=supports, priority=10))


_register_pallas()
