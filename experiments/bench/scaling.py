"""The scale benchmark's arithmetic, free of flags (tests and other scripts import it):
:func:`analytic_flops`, a hand count of one LoRA / LeMo step's matmul FLOPs by category, and
:func:`fitted_max` / :func:`verify_max`, the largest sequence length under a memory budget."""

from __future__ import annotations

import math

import numpy as np

from tokensparse.config import LoRAConfig, ModelConfig
from tokensparse.flops import CATEGORIES

STEP = 4096  # max lengths are multiples of this


def analytic_flops(config: ModelConfig, seq_len: int, keep_ratios, remat: str, *, causal: bool,
                   block_size: int = 64, lora_rank: int = LoRAConfig().rank) -> dict[str, float]:
    """Matmul FLOPs of one LoRA step (batch 1) by category, counted by hand, selection free.

    A layer keeping ``floor(ρ · T / block) · block`` tokens runs its projections on them and its
    attention on them alone (ρ² of the core), its MLP on every token. Forward, then the backward
    of frozen weights: one input-gradient matmul per projection and MLP matmul, the LoRA adapters
    twice their forward (input and weight gradients), attention 2.5 times its forward (flash
    backward: scores recomputed, dV, dP, dQ, dK). Remat ``full`` adds a forward, less the matmuls
    whose outputs the backward does not read (the o projection's and the MLP down projection's).
    The head runs twice (logits recomputed per loss segment in the backward, then dx).
    ``causal``: attention does half the tiles (else all, as the compiled count counts them)."""
    if remat not in ("none", "full"):
        raise ValueError(f"remat={remat!r}: the analytic count knows none and full.")
    d, q, kv, f, r = config.d_model, config.q_dim, config.kv_dim, config.ffn_dim, lora_rank
    again = remat == "full"
    out = dict.fromkeys(CATEGORIES, 0.0)
    for rho in keep_ratios:
        t = seq_len if rho >= 1.0 else math.floor(rho * seq_len / block_size) * block_size
        qkv, o = 2 * t * d * (q + 2 * kv), 2 * t * q * d
        lora_in, lora_out = 2 * t * r * (3 * d + q), 2 * t * r * (q + 2 * kv + d)
        out["projections"] += (2 * (qkv + o) + 3 * (lora_in + lora_out)
                               + again * (qkv + lora_in + 2 * t * r * (q + 2 * kv)))
        core = 4 * t * t * config.n_heads * config.head_dim * (0.5 if causal else 1.0)
        out["attention"] += core * (3.5 + again)
        out["mlp"] += 2 * seq_len * d * f * (6 + 2 * again)
    out["head"] = 4 * seq_len * d * config.vocab_size
    return out


def fitted_max(lengths, values, budget: float, *, cap: int = 2**22) -> int:
    """Largest multiple of :data:`STEP` (≤ ``cap``) at which the least-squares quadratic in T
    through (lengths, values) (a line for two points, proportional for one) stays ≤ ``budget``;
    0 if even :data:`STEP` does not fit."""
    lengths, values = np.asarray(lengths, float), np.asarray(values, float)
    if len(lengths) == 1:
        coeffs = np.array([values[0] / lengths[0], 0.0])
    else:
        coeffs = np.polyfit(lengths, values, min(2, len(lengths) - 1))
    best = 0
    for t in range(STEP, cap + 1, STEP):
        if np.polyval(coeffs, t) > budget:
            break
        best = t
    return best


def verify_max(fits, guess: int, *, max_steps: int = 6) -> tuple[int, bool]:
    """Walk from ``guess`` by :data:`STEP` until ``fits(t)`` and not ``fits(t + STEP)``
    (``fits`` compiles, once per length); (the length, whether it was confirmed within
    ``max_steps`` steps)."""
    known: dict[int, bool] = {}

    def fits_once(t: int) -> bool:
        if t not in known:
            known[t] = bool(fits(t))
        return known[t]

    t = max(guess, STEP)
    ok = fits_once(t)
    for _ in range(max_steps):
        if ok:
            if not fits_once(t + STEP):
                return t, True
            t += STEP
        else:
            if t == STEP:
                return 0, True
            t -= STEP
            ok = fits_once(t)
    return t, False
