"""Inputs the speed benchmarks share: random token batches and the dtype choice for ``--dtype=auto``."""

from __future__ import annotations

import jax
import numpy as np

from tokensparse import data


def resolve_dtype(choice: str) -> str:
    """``choice``, or for ``"auto"``: bfloat16 on a GPU or TPU (the papers' recipes), float32 on a CPU,
    whose bf16 dots are far too slow."""
    if choice != "auto":
        return choice
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> data.Batch:
    """Uniform random tokens, positions 0..T-1, one segment per row: step cost does not depend on text."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch, seq_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
    return data.Batch(tokens, positions, np.zeros(tokens.shape, np.int32))
