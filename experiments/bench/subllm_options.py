"""The SUBLLM routing options both SUBLLM training benchmarks expose as flags.

``--balancer_statistic``, ``--balancer_margin``, ``--balancer_start_scale``,
``--balancer_start_steps`` and ``--bypass_init`` set the :class:`~tokensparse.subllm.SubLLMConfig`
fields of those names, ``--scorer_warmup`` the ``config.subllm`` field of that name; their defaults
are the spec's. :func:`values` gives them as keyword arguments
of :func:`tokensparse.runs.subllm_config_dict`; :func:`changed` names the ones a run sets away from a
preset's, for a run directory. A benchmark with another default calls ``flags.set_default``.
"""

from __future__ import annotations

from absl import flags

from experiments import _checks
from tokensparse import runs
from tokensparse.subllm import balancer
from tokensparse.subllm.balancer import STATISTICS

STATISTIC = flags.DEFINE_string("balancer_statistic", "mean_std",
                                "SubLLMConfig.balancer_statistic: mean_std (the spec's) or proportion.")
MARGIN = flags.DEFINE_float("balancer_margin", 0.05, "SubLLMConfig.balancer_margin: the half-width of "
                            "the band the Balancer acts on (the spec's 0.05). Benchmarks always "
                            "measure against the spec's band, keep ± 0.05.")
START_SCALE = flags.DEFINE_float("balancer_start_scale", balancer.GRAD_SCALE,
                                 "SubLLMConfig.balancer_start_scale: the Balancer's grad_scale at step "
                                 "0 (the spec's 0.04 throughout).")
START_STEPS = flags.DEFINE_integer("balancer_start_steps", 0, "SubLLMConfig.balancer_start_steps: "
                                   "grad_scale falls linearly to 0.04 by this step (0: no start).")
BYPASS_INIT = flags.DEFINE_float("bypass_init", 0.5, "SubLLMConfig.bypass_init (the spec's 0.5).")
SCORER_WARMUP = flags.DEFINE_bool("scorer_warmup", True, "config.subllm.scorer_warmup: the scorers' "
                                  "learning rate warms up with the rest (the spec's); --noscorer_warmup "
                                  "runs them at the peak rate from step 0.")

_checks.one_of(STATISTIC, STATISTICS)
flags.register_validator(MARGIN, lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5).")
flags.register_validator(START_SCALE, lambda v: 0.0 < v <= 10.0, "must be in (0, 10].")
_checks.at_least(START_STEPS, 0)
flags.register_validator(BYPASS_INIT, lambda v: 0.0 < v <= 1.0, "must be in (0, 1].")

_HOLDERS = {"balancer_statistic": STATISTIC, "balancer_margin": MARGIN,
            "balancer_start_scale": START_SCALE, "balancer_start_steps": START_STEPS,
            "bypass_init": BYPASS_INIT, "scorer_warmup": SCORER_WARMUP}


def values() -> dict:
    """The options as ``subllm_config_dict`` keyword arguments (and benchmark settings)."""
    return {name: holder.value for name, holder in _HOLDERS.items()}


def changed(preset_name: str) -> dict:
    """The options whose flag differs from the preset's own value (an empty dict: the preset's run)."""
    preset = runs.subllm_config_dict(preset_name)
    return {name: value for name, value in values().items() if value != preset[name]}
