"""Shared absl plumbing for the experiment entry points: flags (config, workdir, multi-host),
summary printing.

Several hosts: start the same command on every host with ``--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT`` (or ``--distributed`` alone where JAX detects the cluster: Cloud
TPU pods, SLURM, Open MPI). ``jax.distributed.initialize`` runs before anything touches a device; the
run's mesh (``--config.mesh.*``) then spans every host's devices and each process loads only its own
rows of each batch.

Config values are checked (:func:`check_config`) right after flag parsing: a bad value is reported
as the flag that set it (``--config.train.remat='bogus' must be one of ...``) before the corpus is
read or anything is compiled."""

from __future__ import annotations

import json
import pathlib

from absl import flags
from ml_collections import config_flags

from experiments import _checks

CONFIGS = pathlib.Path(__file__).parent / "configs"


def define_flags(default_config: str):
    with _checks.config_overrides_checked():
        config = config_flags.DEFINE_config_file(
            "config", str(CONFIGS / default_config),
            "ml_collections config file (default shown below); override any field with "
            "--config.<path>=VALUE, e.g. --config.train.steps=N, --config.train.remat=full, "
            "--config.progress=False.")
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


def _attention(c) -> None:
    names = _checks.attention_backends()
    if c.get("attention_backend", "auto") not in names:
        raise ValueError(f"config.attention_backend={c.attention_backend!r} must be one of {names}.")


def _train(c):
    from tokensparse import runs

    tc = runs.build_train_config(c.train)
    runs.sequence_layout(tc, runs.build_mesh(c))
    return tc


def _base(c) -> None:
    from tokensparse import runs

    runs.check_base(c.get("base", ""))


def _pretrain(c) -> None:
    from tokensparse import runs
    from tokensparse.config import preset_names
    from tokensparse.subllm import training as subllm_training

    _train(c)
    if not isinstance(c.model, str):
        if c.model.preset not in preset_names():
            raise ValueError(f"config.model.preset={c.model.preset!r} is not a preset; available: "
                             f"{preset_names()}.")
        runs.build_model_config(c.model)
    elif c.model not in runs.MODEL_KINDS:
        raise ValueError(f"config.model={c.model!r} must be one of {runs.MODEL_KINDS} (SUBLLM or "
                         "its dense twin), or a {preset, overrides} dict for a plain Llama.")
    elif "subllm" not in c:
        raise ValueError(f"config.model={c.model!r} needs config.subllm (a SUBLLM config file, "
                         "e.g. experiments/configs/pretrain_subllm_small.py).")
    else:
        runs.build_subllm_config(c.subllm, c.model)
        modes = list(c.subllm.eval_modes)
        if not modes or set(modes) - set(subllm_training.EVAL_MODES):
            raise ValueError(f"config.subllm.eval_modes={modes} must be a non-empty subset of "
                             f"{subllm_training.EVAL_MODES}.")
    _attention(c)


def _finetune(c) -> None:
    from tokensparse import runs

    _base(c)
    tc = _train(c)
    _, lemo = runs.build_finetune_method(c)
    if lemo is not None and tc.seq_len % lemo.block_size:
        raise ValueError(f"config.train.seq_len={tc.seq_len} must be a multiple of "
                         f"config.lemo.block_size={lemo.block_size}: LeMo keeps whole blocks.")
    _attention(c)


def _predictors(c) -> None:
    from tokensparse import runs

    _base(c)
    runs.predictor_train_config(c.train)
    _attention(c)


CHECKS = {"pretrain": _pretrain, "finetune": _finetune, "train_predictors": _predictors}


def check_config(kind: str, c) -> None:
    """Build every part of a ``kind`` run's config that can be built without data or weights
    (``kind``: a key of :data:`CHECKS`); raises ``ValueError`` naming the config key."""
    CHECKS[kind](c)


def main_for(run, config, workdir):
    """An absl ``main`` that checks the config, runs ``run(config, workdir)`` (``run.__name__``
    names its checks) and prints the summary."""
    from absl import logging

    def main(argv):
        del argv
        import jax  # here, not at module level: --help stays fast

        try:
            options = distributed_options()
        except flags.ValidationError as e:
            _checks.fail(str(e))
        if options is not None:
            jax.distributed.initialize(**options)
        try:
            check_config(run.__name__, config.value)
        except ValueError as e:
            _checks.fail(_checks.flag_for_config_error(str(e)))
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        summary = run(config.value, workdir.value)
        if jax.process_index() == 0:
            print_summary(summary)

    return main
