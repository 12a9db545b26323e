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
