"""Algorithm 1 (per-layer threshold tuning): the threshold rule, its dense limit, the tuning loop."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, train
from tokensparse.config import LoRAConfig, preset
from tokensparse.lemo.profiles import algorithm1 as threshold
from tokensparse.llama import Llama

CONFIG = preset("tiny").replace(n_layers=3)
T, BLOCK = 128, 16
LEMO = spec_lemo(block_size=BLOCK, mlp_mode="dense")


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _batch(seed):
    tokens = jax.random.randint(jax.random.key(seed), (1, T), 0, CONFIG.vocab_size)
    return Batch(tokens, jnp.arange(T)[None], jnp.zeros((1, T), jnp.int32))


@pytest.fixture(scope="module")
def model():
    return lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 1.0])
def test_threshold_selection_keeps_blocks_at_or_above_tau(tau):
    scores = jax.random.uniform(jax.random.key(3), (2, 8)) * jnp.array([[1.0], [5.0]])
    sel = threshold.threshold_selection(scores, tau, block_size=4)
    s = np.asarray(scores)
    want_blocks = s / s.max(axis=1, keepdims=True) >= tau
    np.testing.assert_array_equal(np.asarray(sel.valid).reshape(2, 8, 4), want_blocks[..., None]
                                  .repeat(4, axis=2))
    np.testing.assert_array_equal(sel.indices, np.broadcast_to(np.arange(32), (2, 32)))
    assert np.asarray(sel.valid).reshape(2, 8, 4)[:, :, 0].sum(1).min() >= 1  # the top block stays


def test_zero_thresholds_reproduce_the_dense_loss(model):
    batch = _batch(0)
    loss, kept, means = nnx.jit(lambda m, b: threshold._forward(m, b, jnp.zeros(3), LEMO))(model, batch)
    dense, _ = nnx.jit(lambda m, b: train.lm_loss(m, b))(model, batch)
    np.testing.assert_allclose(loss, dense, rtol=1e-6)
    np.testing.assert_array_equal(kept, np.ones(3))
    assert np.all((np.asarray(means) > 0) & (np.asarray(means) <= 1))


def test_higher_thresholds_keep_fewer_blocks(model):
    batch = _batch(1)
    fwd = nnx.jit(lambda m, b, t: threshold._forward(m, b, t, LEMO))
    kept = [np.asarray(fwd(model, batch, jnp.full(3, tau))[1]) for tau in (0.2, 0.6, 0.95)]
    assert np.all(kept[0] >= kept[1]) and np.all(kept[1] >= kept[2]) and np.any(kept[0] > kept[2])


def test_tuning_follows_the_finite_difference_rule_and_returns_a_profile(model):
    batches = [_batch(2), _batch(3)]
    result = threshold.tune_thresholds(model, batches, LEMO, rounds=2, eps=0.05, lr=0.5)
    assert len(result.thresholds) == len(result.profile) == 3
    assert all(0.0 <= t <= 1.0 for t in result.thresholds)
    assert all(0.0 < p <= 1.0 for p in result.profile)
    first, second, final = result.history
    # τ ← clip(τ + η·G), round by round
    np.testing.assert_allclose(second["thresholds"],
                               np.clip(np.add(first["thresholds"], 0.5 * np.array(first["gradient"])),
                                       0, 1), rtol=1e-6)
    np.testing.assert_allclose(final["thresholds"], result.thresholds, rtol=1e-6)
    # the profile is the kept fraction measured at the tuned thresholds; usable as a LeMo profile
    fwd = nnx.jit(lambda m, b, t: threshold._forward(m, b, t, LEMO))
    kept = np.mean([np.asarray(fwd(model, b, jnp.asarray(result.thresholds))[1]) for b in batches], 0)
    np.testing.assert_allclose(result.profile, np.clip(kept, 1e-3, 1), rtol=1e-6)
    spec_lemo(schedule="profile", profile=result.profile).keep_ratios(3)


def test_tuning_rejects_bad_input(model):
    with pytest.raises(ValueError, match="at least one calibration batch"):
        threshold.tune_thresholds(model, [], LEMO)
    bad = Batch(jnp.zeros((1, T + 3), jnp.int32), jnp.arange(T + 3)[None], jnp.zeros((1, T + 3), jnp.int32))
    with pytest.raises(ValueError, match="multiple of the block"):
        threshold.tune_thresholds(model, [bad], LEMO)


def test_algorithm1_schedule_needs_tuning_before_it_has_keep_ratios():
    with pytest.raises(ValueError, match="tune_thresholds"):
        spec_lemo(schedule="algorithm1").keep_ratios(3)
    with pytest.raises(ValueError, match="calibration_windows"):
        spec_lemo(schedule="algorithm1", calibration_windows=0)
