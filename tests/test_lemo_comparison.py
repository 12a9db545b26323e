"""The fair comparison's rows (tokensparse.lemo.comparison): what each row runs, and that the LoRA
baseline run through the LeMo forward is numerically the plain LoRA step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, train
from tokensparse.config import LoRAConfig, preset
from tokensparse.data.batching import Batch
from tokensparse.lemo import comparison
from tokensparse.lemo.forward import lemo_loss
from tokensparse.llama import Llama


def test_rows_split_lemo_into_its_parts():
    lemo = spec_lemo(keep_ratio=0.3, mlp_drop=0.5)
    rows = comparison.comparison_configs(lemo)
    assert tuple(rows) == comparison.ROWS
    assert rows["lemo"] == lemo
    assert rows["lora"].keep_ratios(8) == (1.0,) * 8 and rows["lora"].mlp_mode == "dense"
    assert rows["lemo_elimination"].keep_ratios(8) == lemo.keep_ratios(8)
    assert rows["lemo_elimination"].mlp_mode == "dense"
    assert rows["lemo_mlp"].keep_ratios(8) == (1.0,) * 8
    assert (rows["lemo_mlp"].mlp_mode, rows["lemo_mlp"].mlp_drop) == ("channel_sparse_bwd", 0.5)
    assert comparison.is_plain_lora(rows["lora"]) and not comparison.is_plain_lora(rows["lemo_mlp"])


def test_recompute_is_rematerialisation_the_baseline_gets_too():
    rows = comparison.comparison_configs(spec_lemo(mlp_mode="recompute"))
    assert rows["lora"].mlp_mode == "recompute" and not comparison.is_plain_lora(rows["lora"])
    assert rows["lemo_mlp"] == rows["lora"] and rows["lemo"] == rows["lemo_elimination"]
    profiled = spec_lemo(schedule="profile", profile=(1.0, 0.5), mlp_mode="dense")
    assert comparison.lora_baseline(profiled).keep_ratios(2) == (1.0, 1.0)


@pytest.mark.parametrize("mlp_mode", ["dense", "recompute"])
def test_baseline_through_the_lemo_forward_is_the_plain_lora_step(mlp_mode):
    """Loss and LoRA gradients of the baseline row (every layer dense, through lemo_loss) equal
    train.lm_loss's: the baseline differs from plain LoRA in memory only."""
    config = preset("tiny")
    model = Llama(config, rngs=nnx.Rngs(0))
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    # Non-zero B, so that the LoRA gradients reach every adapter.
    for path, var in nnx.state(model, lora.LoRAParam).flat_state():
        var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var.value.shape))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 128)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), tokens.shape)
    batch = Batch(tokens, positions, jnp.zeros_like(tokens))
    baseline = comparison.lora_baseline(spec_lemo(mlp_mode=mlp_mode))

    def grads(loss_fn):
        def f(lora_state):
            m = nnx.merge(graphdef, lora_state, rest)
            return loss_fn(m, batch)[0]
        return jax.value_and_grad(f)(lora_state)

    graphdef, lora_state, rest = nnx.split(model, lora.LoRAParam, ...)
    want_loss, want = grads(lambda m, b: train.lm_loss(m, b))
    got_loss, got = grads(lambda m, b: lemo_loss(m, b, lemo=baseline))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
