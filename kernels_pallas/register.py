"""The Pallas kernels as backends: entry points and what they support.

``tokensparse`` registers :func:`pallas_attention` (with :func:`supports`) as its ``"pallas"``
attention backend and ``block_scores.block_tiles`` (with ``block_scores.supports``) as its
``"pallas"`` block-scoring backend; arrows point one way: kernels_pallas never imports tokensparse.

Where each kernel runs is :func:`kernels_pallas.reference.platform_target`: the Triton kernel on a
GPU (``segment_attention``), the Mosaic one on a TPU (``segment_attention_tpu``). Elsewhere they only
run interpreted, far too slowly for real work, so :func:`supports` declines unless
``TOKENSPARSE_PALLAS_INTERPRET`` forces interpret mode, which is how CPU tests reach the dispatcher
path: ``=1`` runs the Triton kernel under Pallas' generic interpreter, ``=tpu`` the Mosaic kernel
under the TPU interpreter (``pltpu.InterpretParams``).
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas import segment_attention_tpu as tpu
from kernels_pallas.reference import INTERPRET_ENV, interpret_mode, platform_target
from kernels_pallas.segment_attention import default_config, segment_attention

__all__ = ["INTERPRET_ENV", "interpret_mode", "pallas_attention", "supports"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TPU_DTYPES = (jnp.float32, jnp.bfloat16)  # Mosaic has no fp16 matmul on most generations
_MAX_HEAD_DIM = 256


def supports(q, k, v, *, causal: bool = True) -> str | None:
    """None when the kernels can run these inputs here; otherwise a short reason."""
    del causal  # both masks are supported
    target = platform_target()
    if target.reason is not None:
        return target.reason
    dtypes = _TPU_DTYPES if target.lowering == "mosaic" else _DTYPES
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {names}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    return None


def pallas_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None,
                     kv_segment_ids=None, causal=True, scale=None):
    """The attention backend entry point: this platform's kernel with its default blocks."""
    target = platform_target()
    kwargs = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, causal=causal, scale=scale,
                  interpret=target.interpret)
    if target.lowering == "mosaic":
        return tpu.segment_attention_tpu(q, k, v, **kwargs, **tpu.default_config(q.shape[-1], q.dtype))
    return segment_attention(q, k, v, **kwargs, **default_config(q.shape[-1], q.dtype))
