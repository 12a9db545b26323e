"""The SUBLLM options the SUBLLM training benchmarks take: ``--config.subllm.<field>``.

``config.subllm`` is the pretraining config's SUBLLM section (:func:`experiments.run_configs.subllm_dict`):
every :class:`~tokensparse.subllm.SubLLMConfig` field but the backbone (``structure``, ``keep`` /
``level_keep``, ``balancer_statistic``, ``balancer_margin``, ``balancer_start_scale``,
``balancer_start_steps``, ``bypass_init``, ...) and every
:class:`~tokensparse.pipelines.pretrain.SubLLMTrainConfig` field (``scorer_warmup``,
``scorer_lr_scale``, ``schedule_step_multiplier``, ...). Unset fields keep the value of the
benchmark's ``--preset`` (or the benchmark's own default, :func:`define`'s ``defaults``);
``--config_help`` lists them. :func:`values` gives them all, :func:`changed` the ones a run sets
away from the preset's (for naming its run directory), :func:`apply` writes them into a pretraining
config.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments import config_dicts, run_configs

# Set by the benchmark itself (its --preset flag, and the backbone it builds).
NOT_OPTIONS = ("preset", "overrides")

_FLAGS: config_dicts.ConfigFlags | None = None


def define(**defaults) -> config_dicts.ConfigFlags:
    """Define ``--config.subllm.*`` (every option unset: the preset's, except ``defaults``)."""
    global _FLAGS
    section = run_configs.subllm_dict("subllm-tiny")
    options = config_dict.ConfigDict()
    for name in section:
        if name not in NOT_OPTIONS:
            options[name] = config_dict.placeholder(section.get_type(name))
    for name, value in defaults.items():
        options[name] = value
    _FLAGS = run_configs.define_config_flags(
        config_dict.ConfigDict({"subllm": options}), "pretrain",
        "The SUBLLM's options (the pretraining config's config.subllm, without preset and overrides); "
        "unset: the --preset's.")
    return _FLAGS


def given() -> dict:
    """The options set on the command line or by the benchmark's defaults."""
    return {k: v for k, v in _FLAGS.value.subllm.to_dict().items() if v is not None}


def values(preset_name: str) -> dict:
    """Every option: the preset's, with :func:`given` on top (benchmark settings)."""
    preset = run_configs.subllm_dict(preset_name).to_dict()
    return {k: v for k, v in {**preset, **given()}.items() if k not in NOT_OPTIONS}


def changed(preset_name: str) -> dict:
    """The options whose value differs from the preset's own (an empty dict: the preset's run)."""
    preset = run_configs.subllm_dict(preset_name).to_dict()
    return {name: value for name, value in given().items() if value != preset[name]}


def apply(c: config_dict.ConfigDict) -> None:
    """Write :func:`given` into the pretraining config ``c``'s ``config.subllm``."""
    for name, value in given().items():
        c.subllm[name] = value
