"""The Pallas kernels as an attention backend: entry point and platform check.

``tokensparse.attention`` registers these as its ``"pallas"`` backend (arrows point one way:
kernels_pallas never imports tokensparse).

On a GPU the kernels lower through Triton (``segment_attention``); on a TPU through Mosaic
(``segment_attention_tpu``). Elsewhere they only run interpreted, which is far too slow for real
work, so ``supports`` declines (the dispatcher then warns once and falls back) unless
``TOKENSPARSE_PALLAS_INTERPRET`` forces interpret mode, which is how CPU tests reach the dispatcher
path: ``=1`` runs the Triton kernel under Pallas' generic interpreter, ``=tpu`` the Mosaic kernel
under the TPU interpreter (``pltpu.InterpretParams``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from kernels_pallas import segment_attention_tpu as tpu
from kernels_pallas.segment_attention import default_config, segment_attention

INTERPRET_ENV = "TOKENSPARSE_PALLAS_INTERPRET"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TPU_DTYPES = (jnp.float32, jnp.bfloat16)  # Mosaic has no fp16 matmul on most generations
_MAX_HEAD_DIM = 256


def interpret_mode() -> str | None:
    """None (compile for this platform), ``"gpu"`` or ``"tpu"``: which kernel the env interprets.

    Read at every call, so tests can set the variable with monkeypatch.
    """
    value = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return None
    return "tpu" if value == "tpu" else "gpu"


def interpret_forced() -> bool:
    """True when ``TOKENSPARSE_PALLAS_INTERPRET`` asks for interpret mode of either kernel."""
    return interpret_mode() is not None


def _use_tpu_kernel() -> bool:
    mode = interpret_mode()
    return mode == "tpu" or (mode is None and jax.default_backend() == "tpu")


def gpu_reason() -> str | None:
    platform = jax.default_backend()
    if platform != "gpu":
        return (f"{platform} platform: pallas kernels need a GPU, or {INTERPRET_ENV}=1 for "
                "interpret mode")
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and float(capability) < 8.0:
        return f"GPU compute capability {capability} < 8.0: the Triton kernels need sm80+"
    return None


def _platform_reason() -> str | None:
    platform = jax.default_backend()
    if interpret_forced() or platform == "tpu":
        return None
    if platform != "gpu":
        return (f"{platform} platform: pallas kernels need a GPU or TPU, or {INTERPRET_ENV}=1 "
                "(or =tpu) for interpret mode")
    return gpu_reason()


def supports(q, k, v, *, causal: bool = True) -> str | None:
    """None when the kernels can run these inputs here; otherwise a short reason."""
    del causal  # both masks are supported
    if (reason := _platform_reason()) is not None:
        return reason
    dtypes = _TPU_DTYPES if _use_tpu_kernel() else _DTYPES
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {names}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    return None


def pallas_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None,
                     kv_segment_ids=None, causal=True, scale=None):
    """The backend entry point: the TPU or GPU kernel with its default blocks for this shape."""
    kwargs = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)
    if _use_tpu_kernel():
        cfg = tpu.default_config(q.shape[-1], q.dtype)
        return tpu.segment_attention_tpu(q, k, v, interpret=interpret_mode() == "tpu", **kwargs,
                                         **cfg)
    cfg = default_config(q.shape[-1], q.dtype)
    return segment_attention(q, k, v, interpret=interpret_forced(), **kwargs, **cfg)
