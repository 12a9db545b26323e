"""Gradient accumulation (``train.grad_accum_steps``): k micro-batches give the update of one batch of
k rows (losses, gradient norms and updated weights, fp32), for a plain Llama, a LoRA fine-tune and a
LeMo fine-tune, ragged rows included; the config field and the command-line flag reach the step."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tokensparse import lora, train
from tokensparse.config import LeMoConfig, LoRAConfig, TrainConfig, preset
from tokensparse.lemo.forward import lemo_loss
from tokensparse.llama import Llama

TINY = preset("tiny")
# Plain SGD: the updated weights are then a linear function of the gradient, so the comparison is
# tight (AdamW's first steps, about lr * sign(grad), turn fp32 rounding in near-zero gradient entries
# into visible weight differences; the mechanism is the same for every optax transformation).
SGD = optax.sgd(0.5)


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _ragged_batch(seed=0, b=4, t=64):
    """Rows of different lengths (padding tails of different sizes) and packed documents, so the
    micro-batches have different numbers of targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    for r in range(b):
        cut = int(rng.integers(t // 4, t // 2))
        seg[r, cut:] = 1
        pos[r, cut:] -= cut
        end = t - 7 * r  # row r has 7r padding positions
        seg[r, end:] = -1
        pos[r, end:] = 0
    return Batch(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))


def _run(make_model, loss_fn, wrt, k, steps=2):
    """Losses, grad norms, target counts and the final trained weights of ``steps`` updates with
    ``grad_accum_steps=k`` on a fresh model."""
    model = make_model()
    optimizer = nnx.Optimizer(model, SGD, wrt=wrt)
    step = train.make_train_step(loss_fn, wrt=wrt, grad_accum_steps=k)
    out = []
    for i in range(steps):
        metrics = step(model, optimizer, _ragged_batch(seed=i))
        out.append({key: float(metrics[key]) for key in ("loss", "grad_norm", "tokens")})
    weights = jax.tree.map(np.asarray, nnx.state(model, wrt))
    return out, weights


def _check_same(make_model, loss_fn, wrt=nnx.Param, ks=(4,)):
    whole, w_whole = _run(make_model, loss_fn, wrt, 1)
    for k in ks:  # 4: micro-batches of 1 row; 2: of 2 rows
        parts, w_parts = _run(make_model, loss_fn, wrt, k)
        for a, b in zip(whole, parts, strict=True):
            assert a["tokens"] == b["tokens"]
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
            np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=2e-5)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6),
                     w_whole, w_parts)
    # The batch really is ragged, and training moved the weights (the comparison could fail).
    assert len({float(jnp.sum(_ragged_batch().segment_ids[r] >= 0)) for r in range(4)}) == 4
    before = jax.tree.map(np.asarray, nnx.state(make_model(), wrt))
    moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), before, w_whole)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_plain_llama_micro_batches_equal_one_batch():
    _check_same(lambda: Llama(TINY, rngs=nnx.Rngs(0)), train.lm_loss, ks=(2, 4))


def _lora_model():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    return model


def test_lora_micro_batches_equal_one_batch():
    _check_same(_lora_model, train.lm_loss, wrt=lora.LoRAParam)


def _lemo_loss(mlp_mode):
    lemo = LeMoConfig(block_size=16, keep_ratio=0.5, schedule="all", selector="oracle",
                      mlp_mode=mlp_mode)
    return lambda model, batch: lemo_loss(model, batch, lemo=lemo)


def test_lemo_micro_batches_equal_one_batch():
    """Block selection is per row, so LeMo's elimination accumulates exactly (exact MLP backward)."""
    _check_same(_lora_model, _lemo_loss("recompute"), wrt=lora.LoRAParam)


@pytest.mark.slow
def test_lemo_channel_sparse_backward_ranks_channels_per_micro_batch():
    """channel_sparse_bwd ranks MLP channels over all tokens of what it is given: with
    accumulation, over each micro-batch. The forward (the loss) is unchanged; the gradient is that
    of per-micro-batch channel choices, so it differs from the whole batch's."""
    whole, _ = _run(_lora_model, _lemo_loss("channel_sparse_bwd"), lora.LoRAParam, 1, steps=1)
    parts, _ = _run(_lora_model, _lemo_loss("channel_sparse_bwd"), lora.LoRAParam, 4, steps=1)
    np.testing.assert_allclose(parts[0]["loss"], whole[0]["loss"], rtol=2e-6)
    assert abs(parts[0]["grad_norm"] / whole[0]["grad_norm"] - 1) > 1e-4


def test_split_micro_batches_takes_strided_rows():
    x = jnp.arange(12).reshape(6, 2)
    stacked = train.split_micro_batches({"x": x, "none": None}, 3)
    np.testing.assert_array_equal(stacked["x"][1], x[1::3])
    assert stacked["none"] is None


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="^TrainConfig.grad_accum_steps=3 must divide batch_size=8"):
        TrainConfig(batch_size=8, grad_accum_steps=3)
    with pytest.raises(ValueError, match="^TrainConfig.grad_accum_steps=0 "):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="^grad_accum_steps=0 "):
        train.make_train_step(train.lm_loss, grad_accum_steps=0)
    step = train.make_train_step(train.lm_loss, grad_accum_steps=3)
    model = Llama(TINY, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, SGD, wrt=nnx.Param)
    with pytest.raises(ValueError, match="batch of 4 rows does not split into grad_accum_steps=3"):
        step(model, optimizer, _ragged_batch())


@pytest.mark.parametrize(("kind", "config_file"), [("pretrain", "pretrain_tiny.py"),
                                                   ("finetune", "finetune_tiny.py")])
def test_command_line_flag_reaches_the_train_config(kind, config_file):
    from absl import flags

    from experiments import _cli, run_configs

    fv = flags.FlagValues()
    argv = ["prog", f"--config={_cli.CONFIGS / config_file}", "--config.train.grad_accum_steps=2"]
    config, _ = _cli.define_config(config_file, flag_values=fv, sys_argv=argv)
    fv(argv)
    run = run_configs.BUILDERS[kind](config.value)
    assert run.train.grad_accum_steps == 2


@pytest.mark.slow
def test_accumulation_on_a_mesh_equals_one_unsharded_batch():
    """Batch rows split over data x fsdp = 4 devices: the strided micro-batches keep every device's
    share, and the sharded accumulated update equals the unsharded whole-batch one."""
    from tokensparse import sharding
    from tokensparse.config import MeshConfig

    assert jax.device_count() >= 4, "tests/conftest.py forces 8 host devices"
    batch = _ragged_batch(b=8)
    whole = Llama(TINY, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(whole, SGD, wrt=nnx.Param)
    loss_whole = float(train.make_train_step(train.lm_loss)(whole, opt, batch)["loss"])

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
    parts = Llama(TINY, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(parts, SGD, wrt=nnx.Param)
    with jax.set_mesh(mesh):
        sharding.shard(parts, opt, mesh=mesh)
        step = train.make_train_step(train.lm_loss, grad_accum_steps=2)
        loss_parts = float(step(parts, opt, sharding.shard_batch(batch, mesh))["loss"])
    np.testing.assert_allclose(loss_parts, loss_whole, rtol=2e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5,
                                                         atol=1e-6),
                 nnx.state(whole, nnx.Param), nnx.state(parts, nnx.Param))
