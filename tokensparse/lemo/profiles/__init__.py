"""Per-layer keep-ratio profiles for LeMo, tuned on calibration windows before fine-tuning.

- :mod:`~tokensparse.lemo.profiles.algorithm1`: the paper's Algorithm 1 (``schedule="algorithm1"``):
  per-layer score thresholds climbed by finite differences of the calibration loss.
- :mod:`~tokensparse.lemo.profiles.sensitivity`: ``schedule="sensitivity"``: each layer's measured
  cost of going sparse alone, layers made sparse cheapest first within a loss budget.

Both return a profile that training uses through ``LeMoConfig(schedule="profile", profile=...)``.
"""
