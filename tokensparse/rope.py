"""Rotary position embeddings (rotate-half layout, as Hugging Face Llama) at arbitrary positions.

Positions are explicit arrays, never ``arange``: compacted token subsets keep their original
positions, so RoPE must be evaluated wherever the tokens came from.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tokensparse.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
                        ) -> Float[Array, " half"]:
    """Per-pair rotation rates, with linear or Llama-3 context scaling applied."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old = scaling.original_max_positions
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: Float[Array, "b t h d"], positions: Int[Array, "b t"],
               inv_freq: Float[Array, " half"]) -> Float[Array, "b t h d"]:
    """Rotate ``x`` by its tokens' positions; computed in fp32, returned in ``x.dtype``."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
