"""Named keep-ratio profiles that ship with the library (schedule option ``"profile"``).

``llama2-7b-artifact``: the Jenga artifact's Llama-2-7B attention profile. The spec gives its
eliminated fractions at anchor layers: 0.01 (layer 0), 0.14 (6), 0.29 (10), 0.39 (14), 0.50 (18),
0.55-0.60 for layers 19-30 and 0.51 (31), mean 0.382 (the paper's 38.3% attention saving). Between
the anchors this profile interpolates linearly; layers 19-30 rise linearly from 0.568 to 0.600, the
ramp inside 0.55-0.60 that makes the mean exactly 0.382. It is a reconstruction from those anchors,
not the artifact's table itself. Keep ratios are 1 − eliminated fraction.

Use: ``LeMoConfig(schedule="profile", profile=named("llama2-7b-artifact"))`` (32 layers).
"""

from __future__ import annotations

import numpy as np

_ANCHORS = {0: 0.01, 6: 0.14, 10: 0.29, 14: 0.39, 18: 0.50}


def _llama2_7b_artifact() -> tuple[float, ...]:
    first = np.interp(np.arange(19), sorted(_ANCHORS), [_ANCHORS[k] for k in sorted(_ANCHORS)])
    eliminated = [*first, *np.linspace(0.568, 0.600, 12), 0.51]
    return tuple(round(1.0 - float(e), 6) for e in eliminated)


PROFILES = {"llama2-7b-artifact": _llama2_7b_artifact}


def named(name: str) -> tuple[float, ...]:
    """The per-layer keep ratios of a shipped profile (see the module docstring)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; shipped: {tuple(PROFILES)}.")
    return PROFILES[name]()
