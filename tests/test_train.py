"""Loss, segmented loss, remat, optimizer schedule, LoRA-only steps, sliding-window evaluation."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import data, lora, train
from tokensparse.config import LoRAConfig, TrainConfig, preset
from tokensparse.llama import Llama
from tokensparse.metrics import compiled_memory

TINY = preset("tiny")


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _packed_batch(seed=0, b=2, t=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    seg[:, 20:45] = 1
    seg[:, 45:58] = 2
    seg[:, 58:] = -1  # padding tail
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for s in np.unique(seg[r]):
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx)) if s >= 0 else 0
    return Batch(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))


def test_targets_mask_document_boundaries_and_padding():
    batch = _packed_batch()
    targets, weights = train.next_token_targets(batch.tokens, batch.segment_ids)
    np.testing.assert_array_equal(targets[:, :-1], batch.tokens[:, 1:])
    w = np.asarray(weights[0])
    expect = np.ones(64)
    expect[[19, 44]] = 0  # last token of a document predicts nothing
    expect[57:] = 0  # last token of the last document, and padding
    np.testing.assert_array_equal(w, expect)


def test_loss_equals_brute_force_mean_over_valid_targets():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    batch = _packed_batch()
    loss, aux = nnx.jit(train.lm_loss)(model, batch)
    logits = np.asarray(nnx.jit(lambda m, b: m(b.tokens, b.positions, b.segment_ids))(model, batch),
                        np.float64)
    total, n = 0.0, 0
    seg, tok = np.asarray(batch.segment_ids), np.asarray(batch.tokens)
    for r in range(tok.shape[0]):
        for i in range(tok.shape[1] - 1):
            if seg[r, i] >= 0 and seg[r, i] == seg[r, i + 1]:
                row = logits[r, i]
                total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[tok[r, i + 1]]
                n += 1
    assert int(aux["tokens"]) == n
    np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("segment", [16, 24])  # 24 does not divide 64: exercises the padding path
def test_segmented_loss_equals_plain_loss_and_gradients(tied, segment):
    model = Llama(TINY.replace(tie_embeddings=tied), rngs=nnx.Rngs(0))
    batch = _packed_batch(1)

    def value_and_grad(seg):
        fn = nnx.value_and_grad(lambda m, b: train.lm_loss(m, b, loss_segment=seg)[0])
        return nnx.jit(fn)(model, batch)

    (plain, g_plain), (segmented, g_seg) = value_and_grad(0), value_and_grad(segment)
    np.testing.assert_allclose(segmented, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_seg), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_segmented_loss_lowers_activation_memory():
    config = TINY.replace(vocab_size=16384, n_layers=1)
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 512), jnp.int32)
    batch = Batch(tokens, jnp.arange(512)[None], jnp.zeros((1, 512), jnp.int32))

    def temp(seg):
        fn = nnx.jit(nnx.grad(lambda m, b: train.lm_loss(m, b, loss_segment=seg)[0]))
        return compiled_memory(fn, model, batch).temp_bytes

    full, seg = temp(0), temp(64)
    assert seg < 0.5 * full, (full, seg)


def test_remat_changes_memory_not_values():
    config = TINY.replace(n_layers=3)
    batch = _packed_batch(2, t=128)
    temps, results = {}, {}
    for policy in ("none", "full", "dots", "names", "offload"):
        model = Llama(config, remat=policy, rngs=nnx.Rngs(0))
        fn = nnx.jit(nnx.value_and_grad(lambda m, b: train.lm_loss(m, b)[0]))
        temps[policy] = compiled_memory(fn, model, batch).temp_bytes
        results[policy] = fn(model, batch)
    for policy in ("full", "dots", "names", "offload"):  # offload: on CPU, host memory is device memory
        assert temps[policy] < temps["none"], temps
        np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(results[policy][1]), jax.tree.leaves(results["none"][1]),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert temps["full"] < temps["names"]


def test_lora_only_step_changes_only_lora_parameters():
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    tc = TrainConfig(lr=1e-2, warmup_steps=0)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)
    step = train.make_train_step(train.lm_loss, wrt=lora.LoRAParam)
    base = nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))
    before = jax.tree.map(np.asarray, nnx.state(model, base))
    lora_before = jax.tree.map(np.asarray, lora.lora_state(model))
    losses = [float(step(model, optimizer, _packed_batch(0))["loss"]) for _ in range(5)]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                     nnx.state(model, base)))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), lora_before,
                         jax.tree.map(np.asarray, lora.lora_state(model)))
    assert any(jax.tree.leaves(moved))
    assert losses[-1] < losses[0]


def test_full_training_reduces_loss_on_a_repeated_batch():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tc = TrainConfig(lr=3e-3, warmup_steps=2, steps=20)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=nnx.Param)
    step = train.make_train_step(train.lm_loss)
    losses = [float(step(model, optimizer, _packed_batch(0))["loss"]) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_schedule_warmup_then_cosine_floor():
    tc = TrainConfig(lr=1.0, warmup_steps=10, steps=110, schedule="cosine", min_lr_ratio=0.1)
    lr = train.learning_rate_schedule(tc)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.55, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    const = train.learning_rate_schedule(tc.replace(schedule="constant"))
    assert float(const(1000)) == 1.0


@pytest.mark.parametrize("changes, words", [
    (dict(seq_len=1), "seq_len"), (dict(remat="some"), "remat"), (dict(schedule="linear"), "schedule"),
    (dict(steps=0), "steps"),
])
def test_train_config_errors(changes, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**changes)


@pytest.mark.parametrize("length, seq_len, stride", [(100, 32, 31), (100, 32, 8), (31, 32, 16),
                                                     (65, 32, 20)])
def test_sliding_windows_score_every_target_once_with_most_context(length, seq_len, stride):
    doc = np.arange(length)  # unique values: a window's offset is recoverable from its tokens
    counts = np.zeros(length - 1)
    context = np.zeros(length - 1)
    for w in data.eval_windows([doc], seq_len=seq_len, stride=stride):
        assert w.tokens.shape == (1, seq_len)
        (local,) = np.nonzero(w.loss_mask[0])
        valid = w.segment_ids[0] >= 0
        assert valid[local].all() and valid[local + 1].all()
        counts_before = counts.copy()
        offset = _offset(doc, w.tokens[0][valid])
        counts[offset + local] += 1
        context[offset + local] = local
        assert (counts >= counts_before).all()
    np.testing.assert_array_equal(counts, 1)
    if stride < seq_len and length > seq_len:
        assert context[seq_len:].min() >= seq_len - stride - 1


def _offset(doc, window):
    for start in range(len(doc) - len(window) + 1):
        if np.array_equal(doc[start:start + len(window)], window):
            return start
    raise AssertionError("window not found")


def test_sliding_window_perplexity_equals_loss_on_one_window():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    doc = np.random.default_rng(0).integers(0, TINY.vocab_size, 48)
    eval_step = train.make_eval_step(train.lm_loss)
    result = train.evaluate(eval_step, model, data.eval_windows([doc], seq_len=64))
    batch = Batch(jnp.asarray(doc[None]), jnp.arange(48)[None], jnp.zeros((1, 48), jnp.int32))
    loss, _ = nnx.jit(train.lm_loss)(model, batch)
    np.testing.assert_allclose(result["loss"], float(loss), rtol=1e-5)
    assert result["tokens"] == 47
