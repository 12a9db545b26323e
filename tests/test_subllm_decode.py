"""SUBLLM inference: per-level thresholds θ and their calibration, the end of the root cache, and
prefill == step-by-step decode under the Pallas attention backend (interpret mode on a CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas import reference as kernels_reference
from tokensparse import attention, decode
from tokensparse.generate import Decoder
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm.calibrate import calibrate_thresholds
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import dense_twin, subllm_preset


def _config(**changes):
    base = subllm_preset("subllm-tiny")
    return base.replace(model=base.model.replace(n_layers=4), structure="T(T(T)T)", **changes)


def _tokens(shape, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, 256), np.int32)


@nnx.jit
def _infer(model, tokens):
    return model.forward(tokens, mode="infer")[1]


def test_infer_threshold_per_level_config():
    cfg = _config(infer_threshold=[0.1, -0.2])
    assert cfg.infer_threshold == (0.1, -0.2)
    assert (cfg.level_threshold(1), cfg.level_threshold(2)) == (0.1, -0.2)
    assert _config(infer_threshold=0.3).level_threshold(2) == 0.3
    assert dense_twin(cfg).infer_threshold == 0.0  # a dense structure has no levels
    with pytest.raises(ValueError, match="infer_threshold has 3 values"):
        _config(infer_threshold=(0.0, 0.0, 0.0))


def test_each_level_uses_its_own_threshold():
    tokens = _tokens((2, 32))
    model = SubLLM(_config(infer_threshold=(-1e9, 1e9)), rngs=nnx.Rngs(0))
    sel1, sel2 = _infer(model, jnp.asarray(tokens))["selections"]
    assert np.all(np.asarray(sel1.valid).sum(1) == 32) and not np.any(np.asarray(sel2.valid))
    model = SubLLM(_config(infer_threshold=(1e9, -1e9)), rngs=nnx.Rngs(0))
    sel1, _ = _infer(model, jnp.asarray(tokens))["selections"]
    assert not np.any(np.asarray(sel1.valid))


@pytest.mark.parametrize("keep", [(0.64, 0.64), (0.8, 0.3)])
def test_calibrated_thresholds_hit_each_levels_keep_rate(keep):
    """Each level keeps its target share of its own input (level 2: of what level 1 kept)."""
    tokens = _tokens((2, 200))
    model = SubLLM(_config(), rngs=nnx.Rngs(0))
    thetas = calibrate_thresholds(model, tokens, keep=keep)
    assert model.subllm_config.infer_threshold == 0.0  # left unchanged
    sel1, sel2 = _infer(SubLLM(_config(infer_threshold=thetas), rngs=nnx.Rngs(0)),
                        jnp.asarray(tokens))["selections"]
    kept1, kept2 = np.asarray(sel1.valid).sum(), np.asarray(sel2.valid).sum()
    assert abs(kept1 / tokens.size - keep[0]) < 0.01
    assert abs(kept2 / kept1 - keep[1]) < 0.01


def test_subllm_decoding_past_the_root_cache_raises():
    model = SubLLM(_config(infer_capacity=0.5), rngs=nnx.Rngs(0))
    tokens, lengths = jnp.asarray(_tokens((2, 8))), jnp.asarray([8, 7], jnp.int32)
    _, cache = subllm_decode.prefill(model, tokens, lengths, 8)
    token, positions = jnp.zeros(2, jnp.int32), jnp.asarray([8, 7], jnp.int32)
    with pytest.raises(ValueError, match=r"subllm decode_step: rows \[0\] already hold max_len=8"):
        subllm_decode.decode_step(model, cache, token, positions)
    _, after = nnx.jit(subllm_decode.decode_step)(model, cache, token, positions)
    assert np.asarray(decode.overflowed(after)).tolist() == [True, False]


def test_prefill_equals_step_by_step_decode_under_pallas(monkeypatch):
    """The Pallas kernel (interpret mode here, compiled on a GPU) runs both the prefill and every
    decode step; logits and caches match one infer-mode forward over the whole sequence."""
    monkeypatch.setenv(kernels_reference.INTERPRET_ENV, "1")
    t, steps = 16, 6
    model = SubLLM(_config(infer_capacity=0.75), attention_backend="pallas", rngs=nnx.Rngs(0))
    q = jax.ShapeDtypeStruct((2, 1, 4, 16), jnp.float32)
    assert attention.resolve("pallas", q, q, q) == "pallas"
    tokens, lengths = _tokens((2, t)), np.asarray([t - steps, t - steps - 3], np.int32)
    lay = subllm_decode.layout(model, t)

    @nnx.jit
    def full(m, x):
        h, aux = m.forward(x, mode="infer", capacities=lay.group_sizes[1:])
        return m.head(h), aux

    want, aux = full(model, jnp.asarray(tokens))
    decoder = Decoder(model, t)
    logits, cache = decoder.prefill(tokens, lengths)
    got, rows = [np.asarray(logits)], np.arange(2)
    for i in range(steps):
        logits, cache = decoder.step(cache, tokens[rows, lengths + i], lengths + i)
        got.append(np.asarray(logits))
    idx = lengths[:, None] - 1 + np.arange(steps + 1)[None, :]
    np.testing.assert_allclose(np.stack(got, 1), np.take_along_axis(np.asarray(want), idx[..., None], 1),
                               atol=1e-4, rtol=1e-4)
    kept = [np.asarray(sel.valid).sum(1) for sel in aux["selections"]]
    lengths_after = [np.asarray(n) for n in cache.lengths[1:]]
    # the last row's last 3 tokens were never fed: its caches are a prefix of the forward's
    assert np.all(lengths_after[0] <= kept[0]) and lengths_after[0][0] == kept[0][0]
    assert kept[1].min() > 0 and np.all(kept[1] < kept[0]) and np.all(kept[0] < t)
