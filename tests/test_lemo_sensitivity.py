"""The loss-budgeted sensitivity profile: per-layer costs against brute force, the budget rule,
the measured losses, and bad input."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, train
from tokensparse.config import LoRAConfig, preset
from tokensparse.lemo.forward import lemo_loss
from tokensparse.lemo.profiles import sensitivity
from tokensparse.llama import Llama

CONFIG = preset("tiny").replace(n_layers=3)
T, BLOCK, KEEP = 128, 16, 0.5
LEMO = spec_lemo(block_size=BLOCK)


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _batch(seed, segment_ids=None):
    tokens = jax.random.randint(jax.random.key(seed), (1, T), 0, CONFIG.vocab_size)
    segments = jnp.zeros((1, T), jnp.int32) if segment_ids is None else segment_ids
    return Batch(tokens, jnp.arange(T)[None], segments)


@pytest.fixture(scope="module")
def model():
    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    leaves, tree = jax.tree.flatten(lora.lora_state(m))  # non-zero B: the adapters count too
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(m, jax.tree.unflatten(
        tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))
    return m


def _loss(model, batch, lemo=None):
    if lemo is None:
        return float(nnx.jit(lambda m, b: train.lm_loss(m, b)[0])(model, batch))
    return float(nnx.jit(lambda m, b: lemo_loss(m, b, lemo=lemo)[0])(model, batch))


def _one_layer(layer, keep=KEEP):
    profile = tuple(keep if i == layer else 1.0 for i in range(CONFIG.n_layers))
    return LEMO.replace(schedule="profile", profile=profile)


def test_layer_costs_equal_the_lemo_forward_with_one_sparse_layer(model):
    packed = jnp.concatenate([jnp.zeros((1, 48), jnp.int32), jnp.ones((1, T - 48), jnp.int32)], 1)
    batches = [_batch(0), _batch(1, segment_ids=packed)]
    costs = sensitivity.layer_costs(model, batches, LEMO, KEEP)
    assert costs.shape == (2, CONFIG.n_layers)
    for i, batch in enumerate(batches):
        dense = _loss(model, batch)
        want = [_loss(model, batch, _one_layer(layer)) - dense for layer in range(CONFIG.n_layers)]
        np.testing.assert_allclose(costs[i], want, atol=2e-5)
    assert np.all(np.abs(costs) > 1e-4)  # eliminating half the blocks changes every layer's loss


def test_layer_costs_over_given_candidate_layers_probe_only_those(model):
    """Comparing rules on the same candidates: the given layers cost what they cost when every
    layer is probed; the others are never probed (inf)."""
    batches = [_batch(0)]
    every = sensitivity.layer_costs(model, batches, LEMO, KEEP)[0]
    some = sensitivity.layer_costs(model, batches, LEMO, KEEP, layers=[2, 1])[0]
    assert np.isinf(some[0]) and np.isfinite(some[1:]).all()
    np.testing.assert_allclose(some[1:], every[1:], atol=1e-6)
    assert sensitivity.budget_profile(some, KEEP, 1e9)[0] == 1.0  # never made sparse
    with pytest.raises(ValueError, match="at least one candidate layer"):
        sensitivity.layer_costs(model, batches, LEMO, KEEP, layers=[])


def test_budget_profile_takes_the_cheapest_layers_until_the_budget_is_spent():
    costs = [0.03, -0.01, 0.5, 0.02]
    assert sensitivity.budget_profile(costs, 0.4, 0.05) == (0.4, 0.4, 1.0, 0.4)
    # the running sum decides: after -0.01 + 0.02 = 0.01, adding 0.03 would exceed 0.03
    assert sensitivity.budget_profile(costs, 0.4, 0.03) == (1.0, 0.4, 1.0, 0.4)
    assert sensitivity.budget_profile(costs, 0.4, 0.0) == (1.0, 0.4, 1.0, 1.0)  # only what helps
    assert sensitivity.budget_profile(costs, 0.7, 10.0) == (0.7,) * 4
    # stops at the first layer that does not fit, even if a later one would (they cost more)
    assert sensitivity.budget_profile([0.02, 0.04, 0.05], 0.5, 0.05) == (0.5, 1.0, 1.0)


def test_budget_profile_rejects_bad_input():
    with pytest.raises(ValueError, match="one value per layer"):
        sensitivity.budget_profile([[0.1, 0.2]], 0.5, 0.1)
    with pytest.raises(ValueError, match="budget"):
        sensitivity.budget_profile([0.1], 0.5, -0.1)


def test_tune_profile_reports_the_measured_losses_of_its_profile(model):
    batches, keep, budget = [_batch(2), _batch(3)], 0.25, 0.0
    costs = sensitivity.layer_costs(model, batches, LEMO, keep).mean(0)
    result = sensitivity.tune_profile(model, batches, LEMO, keep_ratio=keep, budget=budget)
    np.testing.assert_allclose(result.costs, costs, atol=1e-6)
    assert result.profile == sensitivity.budget_profile(costs, keep, budget)
    # on this random model some eliminations lower the loss: with no budget, just those are taken
    assert keep in result.profile and 1.0 in result.profile
    assert result.dense_loss == pytest.approx(np.mean([_loss(model, b) for b in batches]), abs=1e-5)
    profile_lemo = LEMO.replace(schedule="profile", profile=result.profile)
    assert result.profile_loss == pytest.approx(
        np.mean([_loss(model, b, profile_lemo) for b in batches]), abs=1e-5)
    assert (result.keep_ratio, result.budget) == (keep, budget)
    spec_lemo(schedule="profile", profile=result.profile).keep_ratios(CONFIG.n_layers)


def test_layer_costs_reject_bad_input(model):
    with pytest.raises(ValueError, match="at least one calibration batch"):
        sensitivity.layer_costs(model, [], LEMO, KEEP)
    with pytest.raises(ValueError, match="eliminates nothing"):
        sensitivity.layer_costs(model, [_batch(0)], LEMO, 1.0)
    bad = Batch(jnp.zeros((1, T + 3), jnp.int32), jnp.arange(T + 3)[None],
                jnp.zeros((1, T + 3), jnp.int32))
    with pytest.raises(ValueError, match="multiple of the block"):
        sensitivity.layer_costs(model, [bad], LEMO, KEEP)


def test_sensitivity_schedule_needs_measuring_before_it_has_keep_ratios():
    with pytest.raises(ValueError, match="tune_profile"):
        spec_lemo(schedule="sensitivity").keep_ratios(3)
    with pytest.raises(ValueError, match="loss_budget"):
        spec_lemo(schedule="sensitivity", loss_budget=-0.1)


def test_layers_the_learned_selector_has_no_weights_for_are_never_probed_nor_made_sparse():
    """A learned selector trained for some layers: the others cost inf (never chosen, reported as
    None) instead of an error; without any weights the rule's own error names the command."""
    from tokensparse.lemo import learned_selector

    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(3)), LoRAConfig(), rngs=nnx.Rngs(4))
    lemo = LEMO.replace(selector="learned", keep_first_block=True)
    with pytest.raises(ValueError, match=r"experiments\.train_selector"):
        sensitivity.layer_costs(m, [_batch(5)], lemo, KEEP)
    learned_selector.attach(m, learned_selector.LearnedSelector(CONFIG.n_layers, CONFIG.d_model,
                                                                layers=[1, 2]))
    assert sensitivity.probed_layers(m, lemo, KEEP) == [1, 2]
    costs = sensitivity.layer_costs(m, [_batch(5)], lemo, KEEP)[0]
    assert np.isinf(costs[0]) and np.isfinite(costs[1:]).all()
    with pytest.raises(ValueError, match=r"cannot select in layers \[0\]"):
        sensitivity.layer_costs(m, [_batch(5)], lemo, KEEP, layers=[0, 1])
    result = sensitivity.tune_profile(m, [_batch(5)], lemo, keep_ratio=KEEP, budget=1e9)
    assert result.profile == (1.0, KEEP, KEEP) and result.costs[0] is None
