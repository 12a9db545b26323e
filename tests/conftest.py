"""Test set-up: 8 simulated CPU devices and the XLA flags the suite compiles with, before jax is imported."""

import os

import _xdist_groups  # imports no jax either
from _env import FAST_COMPILE  # imports no jax: the flags below are set before jax loads

_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_cpu_enable_concurrency_optimized_scheduler=false", FAST_COMPILE)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
# Tests run on CPU unless asked otherwise (e.g. TOKENSPARSE_TEST_PLATFORM=gpu on a GPU machine).
_PLATFORM = os.environ.get("TOKENSPARSE_TEST_PLATFORM", "cpu")
os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(_PLATFORM, _PLATFORM)
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402

# Exact fp32 matmuls everywhere (TF32 on GPUs would break the tight tolerances).
jax.config.update("jax_default_matmul_precision", "highest")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


def pytest_configure(config):
    config.pluginmanager.register(_xdist_groups, "xdist_groups")
