"""Training-free block-score estimators against the dense oracle, and the noise yardstick."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokensparse.lemo import estimators, scoring
from tokensparse.lemo import predictor_metrics as pm

B, NB, BS, H, HKV, D = 2, 5, 8, 4, 2, 16
OPTS = scoring.ScoreOptions(block_size=BS)


def _qk(seed=0, q_const=False, k_const=False):
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (B, NB, BS, H, D))
    k = jax.random.normal(kk, (B, NB, BS, HKV, D))
    if q_const:  # every token of a block equal: its mean is each of them
        q = jnp.broadcast_to(q[:, :, :1], q.shape)
    if k_const:
        k = jnp.broadcast_to(k[:, :, :1], k.shape)
    return q.reshape(B, NB * BS, H, D), k.reshape(B, NB * BS, HKV, D)


def _oracle(q, k):
    return scoring.column_scores(scoring.block_scores_reference(q, k, OPTS)) * OPTS.normalizer


@pytest.mark.parametrize("name, q_const, k_const", [
    ("block_mean", True, True), ("query_mean", True, False)])
def test_estimator_is_the_oracle_when_its_summaries_are_exact(name, q_const, k_const):
    """Where every token of a block equals the block's summary the estimate is the oracle itself
    (GQA heads repeated as the oracle repeats them); on random tokens it is not."""
    q, k = _qk(q_const=q_const, k_const=k_const)
    np.testing.assert_allclose(estimators.estimate(name, q, k, BS), _oracle(q, k), rtol=1e-5)
    q, k = _qk(seed=1)
    assert not np.allclose(estimators.estimate(name, q, k, BS), _oracle(q, k), rtol=1e-3)


def test_top_norm_with_every_token_is_the_oracle():
    q, k = _qk(seed=2)
    np.testing.assert_allclose(estimators.top_norm(q, k, BS, r=BS), _oracle(q, k), rtol=1e-5)
    fewer = estimators.top_norm(q, k, BS, r=2)
    assert np.all(np.asarray(fewer) <= np.asarray(_oracle(q, k)) * (1 + 1e-6))  # a max over fewer pairs
    assert not np.allclose(fewer, _oracle(q, k), rtol=1e-3)


def test_query_mean_memory_grows_linearly():
    """Its [n_b, T] logits are fused into the max: compiled temporaries grow linearly in T."""
    def temp(t):
        q = jax.ShapeDtypeStruct((1, t, H, D), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, HKV, D), jnp.float32)
        fn = jax.jit(lambda q, k: estimators.query_mean(q, k, 64))
        return fn.lower(q, k).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(1024), temp(4096)
    assert large < 4 * small * 1.25, (small, large)  # quadratic would be 16x
    assert large < (4096 // 64) * 4096 * H * 4  # below the unfused [n_b, T, H] logits


def test_estimator_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match="must be one of"):
        estimators.estimate("nope", q, k, BS)
    with pytest.raises(ValueError, match="multiple of block_size"):
        estimators.block_mean(q[:, :-1], k[:, :-1], BS)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        estimators.query_mean(q[:, :, :3], k, BS)
    with pytest.raises(ValueError, match="r=9"):
        estimators.top_norm(q, k, BS, r=9)


def test_recall_under_noise_falls_from_exact_to_chance():
    rng = np.random.default_rng(0)
    row = rng.standard_normal(50)
    assert pm.recall_under_noise(row, 0.0, 0.4, rng) == pytest.approx((1.0, 1.0))
    small, rho_small = pm.recall_under_noise(row, 0.1, 0.4, rng, draws=64)
    large, rho_large = pm.recall_under_noise(row, 0.5, 0.4, rng, draws=64)
    chance, rho_chance = pm.recall_under_noise(row, 1e4, 0.4, rng, draws=400)
    assert 1.0 > small > large > chance and rho_small > rho_large > rho_chance
    assert chance == pytest.approx(0.4, abs=0.04) and abs(rho_chance) < 0.05
