"""The training loop's failure handling: a NaN loss stops the run and keeps the last good checkpoint."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tokensparse.checkpoint import Checkpointer
from tokensparse.config import TrainConfig, preset
from tokensparse.llama import Llama
from tokensparse.loop import TrainingDiverged, train_loop


class Batch(NamedTuple):
    tokens: np.ndarray


class Batches:
    def batch(self, step):
        return Batch(np.full((1, 4), step, np.int32))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = Llama(preset("tiny"), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)

    def step(model, optimizer, batch):
        bad = int(batch.tokens[0, 0]) == 5
        return {"loss": jnp.float32(jnp.nan if bad else 1.0), "grad_norm": jnp.float32(0.0)}

    tc = TrainConfig(steps=10, checkpoint_every=2, log_every=1)
    with pytest.raises(TrainingDiverged, match=r"at step 5.*last good checkpoint is step 4"):
        train_loop(workdir=tmp_path, model=model, optimizer=optimizer, train_step=step,
                   batches=Batches(), tc=tc, metadata={"model": {}}, progress=False)
    with Checkpointer(tmp_path / "checkpoints", save_every=2) as ckpt:
        assert ckpt.latest_step() == 4
        assert ckpt.restore_metadata()["data_step"] == 4


def _lora_dropout_run(workdir, steps):
    import jax

    from tokensparse import data, lora, train
    from tokensparse.config import LoRAConfig

    model = lora.add_lora(Llama(preset("tiny"), rngs=nnx.Rngs(0)), LoRAConfig(dropout=0.5),
                          rngs=nnx.Rngs(1))
    tc = TrainConfig(steps=steps, checkpoint_every=2, log_every=1, lr=1e-2, warmup_steps=0,
                     schedule="constant")  # the cosine schedule would depend on `steps`
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)
    step = train.make_train_step(lambda m, b: train.lm_loss(m, b), wrt=lora.LoRAParam)

    class TokenBatches:
        def batch(self, i):
            tokens = np.asarray(jax.random.randint(jax.random.key(i), (1, 16), 0, 256), np.int32)
            return data.Batch(tokens, np.arange(16, dtype=np.int32)[None], np.zeros_like(tokens))

    train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step,
               batches=TokenBatches(), tc=tc, wrt=lora.LoRAParam, metadata={"model": {}},
               progress=False)
    return model


def test_resume_restores_dropout_rng_and_optimizer_exactly(tmp_path):
    """Stopping at step 2 and resuming to 4 gives the same LoRA weights as running 4 straight through:
    the dropout key (a typed PRNG key in RngState) and the Adam moments come back from the checkpoint."""
    import jax

    from tokensparse import lora

    straight = _lora_dropout_run(tmp_path / "straight", 4)
    _lora_dropout_run(tmp_path / "resumed", 2)
    resumed = _lora_dropout_run(tmp_path / "resumed", 4)
    a, b = lora.lora_state(straight), lora.lora_state(resumed)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    # and the run really trained (b moved off its zero init), so equality above is not vacuous
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(a))
