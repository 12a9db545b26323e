"""LeMo configs for the mechanism tests.

The library's default selection rule is the learned selector, whose weights exist only for the
models they were trained on; the tests of LeMo's mechanisms (elimination, gradients, schedules,
sharding) run on random tiny models, so they select the spec's way: the oracle, no forced first
block, eliminated blocks passed through (``tests/test_lemo_fill.py`` tests the default fill). Tests
of the default itself build ``LeMoConfig()`` directly.
"""

from tokensparse.config import LeMoConfig


def spec_lemo(**fields) -> LeMoConfig:
    """``LeMoConfig(**fields)`` the spec's way: the oracle, no forced first block, eliminated
    blocks passed through."""
    return LeMoConfig(**{"selector": "oracle", "keep_first_block": False, "eliminated": "pass",
                         **fields})
