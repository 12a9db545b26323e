"""FSDP (ZeRO-3) keeps weight shards, not gathered weights, for the backward: on 8 simulated CPU
devices, a LoRA / LeMo gradient step with the base weights split over ``fsdp`` needs at most one
layer's gathered weights of temporary memory more than the same step on one device, computes the
same loss and LoRA gradients, and does no more matmul work (no weight gradients for frozen
weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import flops, lora, sharding, train
from tokensparse.config import LoRAConfig, MeshConfig, preset
from tokensparse.data import Batch
from tokensparse.lemo.comparison import comparison_configs
from tokensparse.lemo.forward import group_layers, lemo_loss
from tokensparse.llama import Llama

# Weights large next to one short sequence's activations, so keeping every layer's gathered weights
# (the bug this guards against) would dwarf the allowed one layer. f32 on a CPU: no hidden upcasts.
CONFIG = preset("tiny").replace(d_model=128, ffn_dim=512, n_layers=6, n_heads=4, n_kv_heads=2,
                                head_dim=32)
T = 128
LEMO = spec_lemo()  # keep 0.4 in layers 2..4, channel-sparse MLP backward (102 of 512 channels)
METHODS = ("lora", "lemo")


def _layer_weight_bytes(config) -> int:
    d, q, kv, f = config.d_model, config.n_heads * config.head_dim, \
        config.n_kv_heads * config.head_dim, config.ffn_dim
    return 4 * (d * q + 2 * d * kv + q * d + 3 * d * f)  # f32


def _model(method: str, seed: int = 0) -> Llama:
    model = lora.add_lora(Llama(CONFIG, attention_backend="chunked", rngs=nnx.Rngs(seed)),
                          LoRAConfig(), rngs=nnx.Rngs(seed + 1))
    # B starts at zero, which would make every A gradient zero: give the adapters random B.
    state = nnx.state(model, lora.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]))
    return model if method == "lora" else group_layers(model, comparison_configs(LEMO)[method])


def _loss_fn(method: str):
    row = comparison_configs(LEMO)[method]

    def loss(model, batch):
        if method == "lora":
            return train.lm_loss(model, batch, loss_segment=64)[0]
        return lemo_loss(model, batch, lemo=row, loss_segment=64)[0]

    return loss


def _split_step(method: str, model: Llama):
    """``(step, lora_state, rest)``: ``step(lora_state, rest, batch) -> (loss, LoRA grads)``."""
    graphdef, lora_state, rest = nnx.split(model, lora.LoRAParam, ...)
    loss = _loss_fn(method)

    def step(lora_state, rest, batch):
        return jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s, rest), batch))(lora_state)

    return jax.jit(step), lora_state, rest


def _batch(batch_size: int, seed: int = 0) -> Batch:
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (batch_size, T), 0,
                                           CONFIG.vocab_size), np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape).copy()
    return Batch(tokens, positions, np.zeros(tokens.shape, np.int32))


def _compiled(method: str, fsdp: int):
    """``(compiled step, its arguments)`` on one sequence (so activations are whole on every device
    and temp memory differs only by what the mesh adds), on ``fsdp`` devices (1: no mesh at all)."""
    step, lora_state, rest = _split_step(method, _model(method))
    args = (lora_state, rest, _batch(1, seed=3))
    if fsdp > 1:
        mesh = sharding.make_mesh(MeshConfig(fsdp=fsdp), jax.devices()[:fsdp])
        with jax.set_mesh(mesh):
            args = (*(jax.device_put(s, sharding.state_shardings(s, mesh)) for s in args[:2]),
                    sharding.shard_batch(args[2], mesh))
            return step.lower(*args).compile(), args
    return step.lower(*args).compile(), args


@pytest.fixture(scope="module")
def compiled():
    return {(method, fsdp): _compiled(method, fsdp) for method in METHODS for fsdp in (1, 8)}


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_temp_exceeds_one_device_by_at_most_one_layer_of_weights(compiled, method):
    one, split = (compiled[method, f][0].memory_analysis() for f in (1, 8))
    layer = _layer_weight_bytes(CONFIG)
    # The sharded arguments are about 1/8 of one device's: the weights really are split.
    assert split.argument_size_in_bytes < one.argument_size_in_bytes / 4
    extra = split.temp_size_in_bytes - one.temp_size_in_bytes
    assert extra <= layer, (f"{method}: fsdp8 temp is {extra} bytes over one device's; one layer's "
                            f"weights are {layer} (all {CONFIG.n_layers}: {CONFIG.n_layers * layer})")


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_does_no_extra_matmul_work(compiled, method):
    # Re-gathering a frozen weight in the backward must bring neither its (unneeded) weight gradient
    # nor a second forward matmul along: per device (one sequence, so every device runs every
    # token) the matmul FLOPs are at most the one-device step's.
    one, split = (flops.compiled_flops(compiled[method, f][0]) for f in (1, 8))
    assert split <= one * 1.01, (split, one)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_step_equals_one_device_step(compiled, method):
    (want_loss, want_grads), (loss, grads) = (
        compiled[method, f][0](*compiled[method, f][1]) for f in (1, 8))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    flat, flat_want = (jax.tree.leaves(g) for g in (grads, want_grads))
    assert len(flat) == len(flat_want) > 0
    for got, want in zip(flat, flat_want, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 0  # adapters with random B: real gradients
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6)
