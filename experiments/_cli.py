"""Shared absl plumbing for the experiment entry points: flags (config, workdir, multi-host),
summary printing.

Several hosts: start the same command on every host with ``--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT`` (or ``--distributed`` alone where JAX detects the cluster: Cloud
TPU pods, SLURM, Open MPI). ``jax.distributed.initialize`` runs before anything touches a device; the
run's mesh (``--config.mesh.*``) then spans every host's devices and each process loads only its own
rows of each batch."""

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


def main_for(run, config, workdir):
    """An absl ``main`` that runs ``run(config, workdir)`` and prints its summary."""
    from absl import logging

    def main(argv):
        del argv
        import jax  # here, not at module level: --help stays fast

        options = distributed_options()
        if options is not None:
            jax.distributed.initialize(**options)
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        summary = run(config.value, workdir.value)
        if jax.process_index() == 0:
            print_summary(summary)

    return main
