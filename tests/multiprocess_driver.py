"""One process of a (possibly) multi-process JAX job running pipeline tasks, for
``tests/test_multiprocess.py``.

    python tests/multiprocess_driver.py TASKS_JSON [COORDINATOR NUM_PROCESSES PROCESS_ID]

``TASKS_JSON`` is a list of ``{"kind": "pretrain" | "finetune", "workdir": DIR, "set": {"train.steps":
8, ...}}``, run in order through the experiments' own config files (``pretrain_tiny.py``,
``finetune_tiny.py``) and pipelines (``experiments.run_configs``), as the command lines run them;
running several in one process spares the start-up and ``jax.distributed`` connection of each. With
a coordinator, ``jax.distributed.initialize`` runs first (CPU collectives: gloo, JAX's default).
The devices come from the environment (``--xla_force_host_platform_device_count``). Each process
prints one ``RESULT {json}`` line per task: its summary and the mesh's process layout.
"""

from __future__ import annotations

import json
import sys


def _set(c, path: str, value) -> None:
    *parents, name = path.split(".")
    for part in parents:
        c = getattr(c, part)
    setattr(c, name, value)


def main(argv: list[str]) -> None:
    tasks = json.loads(argv[1])
    import jax

    if len(argv) > 2:
        coordinator, n, i = argv[2], int(argv[3]), int(argv[4])
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)

    from experiments import run_configs
    from experiments.configs import finetune_tiny, pretrain_tiny
    from tokensparse.pipelines import common

    configs = {"pretrain": pretrain_tiny, "finetune": finetune_tiny}
    for task in tasks:
        c = configs[task["kind"]].get_config()
        for path, value in task.get("set", {}).items():
            _set(c, path, value)
        run = run_configs.build(task["kind"], c)
        mesh = common.make_mesh(run.mesh, "config")
        layout = None if mesh is None else [[d.process_index for d in row.flat]
                                            for row in mesh.devices.reshape(mesh.devices.shape[0], -1)]
        summary = run_configs.PIPELINES[task["kind"]](run, task["workdir"])
        print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                      "devices": jax.device_count(), "mesh_processes": layout,
                                      "summary": summary}, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv)
