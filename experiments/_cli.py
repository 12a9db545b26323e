"""Shared absl plumbing for the experiment entry points (flags, multi-line summary printing)."""

from __future__ import annotations

import json
import pathlib

from absl import flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).parent / "configs"


def define_flags(default_config: str):
    config = config_flags.DEFINE_config_file(
        "config", str(CONFIGS / default_config),
        "ml_collections config file; override fields with --config.train.steps=N etc.")
    workdir = flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, "
                                  "checkpoints/); an existing one is resumed.", required=True)
    return config, workdir


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
        print(f"{key:<{width}}  {shown}")


def main_for(run, config, workdir):
    """An absl ``main`` that runs ``run(config, workdir)`` and prints its summary."""
    from absl import logging

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        print_summary(run(config.value, workdir.value))

    return main
