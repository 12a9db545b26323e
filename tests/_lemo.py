"""LeMo configs for the mechanism tests.

The library's default selection rule is the learned selector, whose weights exist only for the
models they were trained on; the tests of LeMo's mechanisms (elimination, gradients, schedules,
sharding) run on random tiny models, so they select the spec's way: the oracle, no forced first
block. Tests of the default itself build ``LeMoConfig()`` directly.
"""

from tokensparse.config import LeMoConfig


def spec_lemo(**fields) -> LeMoConfig:
    """``LeMoConfig(**fields)`` selecting with the spec's oracle and no forced first block."""
    return LeMoConfig(**{"selector": "oracle", "keep_first_block": False, **fields})
