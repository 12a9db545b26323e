"""Pallas kernels, each with a custom_vjp (where differentiable) and a dense reference to test
against; self-contained: nothing here imports ``tokensparse``.

- :mod:`~kernels_pallas.reference`: the mask rule, the dense references, ``BlockSizes`` and the
  platform check every kernel uses.
- :mod:`~kernels_pallas.segment_attention` (Triton, GPU) and
  :mod:`~kernels_pallas.segment_attention_tpu` (Mosaic, TPU): position/segment-masked flash
  attention, sharing :mod:`~kernels_pallas.tile_schedule`.
- :mod:`~kernels_pallas.block_scores`: LeMo's block informativeness tiles (Triton).
- :mod:`~kernels_pallas.register`: the attention entry point and support checks ``tokensparse``
  registers as its ``"pallas"`` backend.

Importing this package never fails on CPU (the kernels then decline, or run interpreted).
"""

from kernels_pallas.reference import (
    INTERPRET_ENV,
    BlockSizes,
    attention_mask,
    block_scores_reference,
    interpret_mode,
    platform_target,
    reference_attention,
    visible,
)
from kernels_pallas.register import pallas_attention, supports
from kernels_pallas.segment_attention import default_config, segment_attention
from kernels_pallas.segment_attention_tpu import segment_attention_tpu

__all__ = ["INTERPRET_ENV", "BlockSizes", "attention_mask", "block_scores_reference",
           "default_config", "interpret_mode", "pallas_attention", "platform_target",
           "reference_attention", "segment_attention", "segment_attention_tpu", "supports",
           "visible"]
