"""XLA flags of the test suite, and the environment of the processes tests start.

The suite compiles hundreds of small programs, and on CPU most of each compile is LLVM optimising
the generated code: a tiny LoRA train step compiles in 19.5 s with the default level and 4.8 s at
level 0. At test sizes the slower code costs far less than that. Benchmarks and real runs keep the
default; only the tests (and the processes they start) lower it.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def subprocess_env() -> dict[str, str]:
    """``os.environ`` for a child process: CPU, offline, fast compiles, and none of the suite's own
    XLA flags (its 8 simulated devices: a child that wants devices sets up its own)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE})
    # The repository root: `experiments` (the scripts and benchmarks) is not part of the installed
    # package, and a child started as `python path/to/file.py` does not see the working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env
