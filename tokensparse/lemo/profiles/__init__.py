"""Per-layer keep-ratio profiles for LeMo, tuned on calibration windows before fine-tuning.

- :mod:`~tokensparse.lemo.profiles.algorithm1`: the paper's Algorithm 1 (``schedule="algorithm1"``):
  per-layer score thresholds climbed by finite differences of the calibration loss.
- :mod:`~tokensparse.lemo.profiles.sensitivity`: ``schedule="sensitivity"``: each layer's measured
  cost of going sparse alone, layers made sparse cheapest first within a loss budget.

- :mod:`~tokensparse.lemo.profiles.named`: profiles that ship with the library, e.g.
  ``named("llama2-7b-artifact")`` (the artifact's Llama-2-7B attention profile).

All return a profile that training uses through ``LeMoConfig(schedule="profile", profile=...)``.
"""

from tokensparse.lemo.profiles.named import named

__all__ = ["named"]
