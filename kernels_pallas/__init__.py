"""Pallas kernels for tokensparse, each with a custom_vjp and a dense reference to test against.

``tokensparse.attention`` registers ``register.pallas_attention`` as its ``"pallas"`` backend: the
Mosaic kernel on TPU (``segment_attention_tpu``), the Triton one on GPU (``segment_attention``).
Importing this package never fails on CPU (the backend then declines and the dispatcher falls back
to ``"xla"``).
"""

from kernels_pallas.register import (
    INTERPRET_ENV,
    interpret_forced,
    interpret_mode,
    pallas_attention,
    supports,
)
from kernels_pallas.segment_attention import default_config, segment_attention
from kernels_pallas.segment_attention_tpu import segment_attention_tpu

__all__ = ["INTERPRET_ENV", "default_config", "interpret_forced", "interpret_mode",
           "pallas_attention", "segment_attention", "segment_attention_tpu", "supports"]
