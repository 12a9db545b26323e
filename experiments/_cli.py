"""Shared absl plumbing for the experiment entry points: flags (config, workdir, multi-host),
summary printing.

Several hosts: start the same command on every host with ``--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT`` (or ``--distributed`` alone where JAX detects the cluster: Cloud
TPU pods, SLURM, Open MPI). ``jax.distributed.initialize`` runs before anything touches a device; the
run's mesh (``--config.mesh.*``) then spans every host's devices and each process loads only its own
rows of each batch.

The config file is an ml_collections ConfigDict generated from the library's config dataclasses
(:mod:`experiments.config_dicts`); ``--config_help`` lists every field with its value and meaning.
Right after flag parsing the config is built into the pipeline's dataclass, whose validation runs
then: a bad value is reported as the flag that set it (``--config.train.remat='bogus' must be one
of ...``) before the corpus is read or anything is compiled.

Exit codes: 0 a finished run; 1 an error in the input (flags, config, corpus, base, a workdir that
is a file or is in use by another run, a resume with changed settings: one line on stderr, the
traceback with ``--verbose``); 128 + the signal's number for a run stopped by a signal (143 SIGTERM,
130 Ctrl-C): its checkpoint is saved and rerunning the same command resumes it, but it has no
``summary.json`` (nor, for pretraining, ``hf/`` export), so ``pretrain && finetune`` stops there."""

from __future__ import annotations

import json
import pathlib
import signal
import sys

from absl import flags
from ml_collections import config_flags

from experiments import _checks, run_configs

CONFIGS = pathlib.Path(__file__).parent / "configs"


def define_config(default_config: str, *, flag_values=flags.FLAGS, sys_argv=None):
    """``--config`` (an experiment config file) with ``--config.PATH=VALUE`` overrides, and
    ``--config_help``; ``flag_values`` / ``sys_argv`` let tests parse a private command line."""
    with _checks.config_overrides_checked(sys_argv):
        config = config_flags.DEFINE_config_file(
            "config", str(CONFIGS / default_config),
            "ml_collections config file (default shown below); override any field with "
            "--config.<path>=VALUE, e.g. --config.train.steps=N, --config.train.remat=full, "
            "--config.lora.targets=q,v, --config.lemo.profile='[1.0, 0.5]', --config.progress=False. "
            "--config_help lists every field.", flag_values=flag_values, sys_argv=sys_argv)
    config_help = flags.DEFINE_bool("config_help", False, "Print every --config field with its value "
                                    "(after the overrides given) and meaning, then exit.",
                                    flag_values=flag_values)
    return config, config_help


def define_flags(default_config: str):
    config, config_help = define_config(default_config)
    workdir = flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, "
                                  "checkpoints/); an existing one is resumed.")
    flags.register_multi_flags_validator(
        [workdir, config_help], lambda f: f["workdir"] is not None or f["config_help"],
        "--workdir is required (the run directory).")
    return config, workdir


_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host); "
                                 "implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).",
                                   lower_bound=0)


def distributed_options() -> dict | None:
    """``jax.distributed.initialize`` keyword arguments from the flags (None: single process)."""
    if not (_DISTRIBUTED.value or _COORDINATOR.value):
        if _NUM_PROCESSES.value not in (None, 1) or _PROCESS_ID.value not in (None, 0):
            raise flags.ValidationError("--num_processes / --process_id need --coordinator_address "
                                        "(or --distributed where the cluster is auto-detected).")
        return None
    n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
    if n is not None and i is not None and i >= n:
        raise flags.ValidationError(f"--process_id={i} must be < --num_processes={n}.")
    return {"coordinator_address": _COORDINATOR.value, "num_processes": n, "process_id": i}


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
        print(f"{key:<{width}}  {shown}")


CHECKS = run_configs.BUILDERS  # the run kinds check_config knows


def check_config(kind: str, c):
    """The pipeline config of a ``kind`` run (``pretrain``, ``finetune``, ``train_predictors``) from
    its ConfigDict, validated, and checked against this machine without data or weights; raises
    ``ValueError`` naming the config key."""
    return run_configs.build(kind, c)


def main_for(kind: str, config, workdir):
    """An absl ``main`` that builds and checks the ``kind`` run's config, runs its pipeline and
    prints the summary (``--config_help``: prints the config's fields instead)."""
    from absl import logging

    def main(argv):
        del argv
        if flags.FLAGS["config_help"].value:
            print(run_configs.describe(kind, config.value))
            sys.exit(0)
        import jax  # here, not at module level: --help stays fast

        try:
            options = distributed_options()
        except flags.ValidationError as e:
            _checks.fail(str(e))
        if options is not None:
            jax.distributed.initialize(**options)
        try:
            run = check_config(kind, config.value)
        except ValueError as e:
            _checks.fail(_checks.flag_for_config_error(str(e)))
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        summary = run_configs.PIPELINES[kind](run, workdir.value)
        if summary.get("interrupted"):
            name = summary.get("signal") or "SIGINT"
            sys.stderr.write(f"{kind}: stopped by {name} at step {summary['steps']}; the checkpoint "
                             f"is saved in {workdir.value}: rerun the same command to resume.\n")
            sys.exit(128 + signal.Signals[name].value)
        if jax.process_index() == 0:
            print_summary(summary)

    return main
