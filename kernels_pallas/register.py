"""The Pallas kernels as an attention backend: entry point and platform check.

``tokensparse.attention`` registers these as its ``"pallas"`` backend (arrows point one way:
kernels_pallas never imports tokensparse).

On a GPU the kernels lower through Triton. Elsewhere they only run in interpret mode, which is far
too slow for real work, so ``supports`` declines (the dispatcher then warns once and falls back)
unless ``TOKENSPARSE_PALLAS_INTERPRET=1`` forces interpret mode, which is how CPU tests reach the
dispatcher path.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from kernels_pallas.segment_attention import default_config, segment_attention

INTERPRET_ENV = "TOKENSPARSE_PALLAS_INTERPRET"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_HEAD_DIM = 256


def interpret_forced() -> bool:
    """True when ``TOKENSPARSE_PALLAS_INTERPRET`` asks for interpret mode (read at every call)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def gpu_reason() -> str | None:
    platform = jax.default_backend()
    if platform != "gpu":
        return (f"{platform} platform: pallas kernels need a GPU, or {INTERPRET_ENV}=1 for "
                "interpret mode")
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and float(capability) < 8.0:
        return f"GPU compute capability {capability} < 8.0: the Triton kernels need sm80+"
    return None


def supports(q, k, v, *, causal: bool = True) -> str | None:
    """None when the kernels can run these inputs here; otherwise a short reason."""
    del causal  # both masks are supported
    if not interpret_forced() and (reason := gpu_reason()) is not None:
        return reason
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of float32, bfloat16, float16"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    return None


def pallas_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None,
                     kv_segment_ids=None, causal=True, scale=None):
    """The backend entry point: :func:`segment_attention` with tuned defaults for this shape."""
    cfg = default_config(q.shape[-1], q.dtype)
    return segment_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             causal=causal, scale=scale, interpret=interpret_forced(), **cfg)
