"""Inputs the benchmarks share: random token batches, the dtype choice for ``--dtype=auto``, and the
abstract LoRA / LeMo training step the compile-only benchmarks lower."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse import data, lora, train
from tokensparse.config import LeMoConfig, LoRAConfig, ModelConfig, preset
from tokensparse.lemo import learned_selector
from tokensparse.lemo.comparison import ROWS, comparison_configs, is_plain_lora
from tokensparse.lemo.forward import group_layers, lemo_loss
from tokensparse.llama import Llama


def resolve_dtype(choice: str) -> str:
    """``choice``, or for ``"auto"``: bfloat16 on a GPU or TPU (the papers' recipes), float32 on a CPU,
    whose bf16 dots are far too slow."""
    if choice != "auto":
        return choice
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> data.Batch:
    """Uniform random tokens, positions 0..T-1, one segment per row: step cost does not depend on text."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch, seq_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()
    return data.Batch(tokens, positions, np.zeros(tokens.shape, np.int32))


def with_placeholder_selector(model: Llama, lemo: LeMoConfig) -> Llama:
    """``model``, with zero learned-selector weights of the real shape attached when ``lemo``
    selects with the learned rule and the model has none: a benchmark's time, memory and FLOPs do not
    depend on their values (every block ties), and a random-weight preset has no trained ones."""
    if lemo.selector == "learned" and learned_selector.attached(model) is None:
        config = model.config
        learned_selector.attach(model, learned_selector.LearnedSelector(
            config.n_layers, config.d_model, layers=range(config.n_layers)))
    return model


class AbstractBatch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def lora_step(config: ModelConfig, seq_len: int, method: str, *, lemo: LeMoConfig,
              remat: str = "none", attention: str = "chunked", scan_layers: bool = True,
              loss_segment: int = 2048):
    """``(loss, lora_state, rest)``: one row of the fair comparison as a pure function of the LoRA
    weights, the other parameters and a batch, on abstract (shape-only) parameters; nothing is
    allocated. ``method`` is a row of :data:`tokensparse.lemo.comparison.ROWS` (``"lora"``: the
    fair baseline for ``lemo``, which has LeMo's MLP rematerialisation when ``lemo`` uses it;
    ``"lemo"``: ``lemo`` itself). LoRA is r=8 on q, k, v, o; the layers are grouped to the row's
    runs (no weight copies in its scans). Call it under the mesh the step will run on."""
    if method not in ROWS:
        raise ValueError(f"method={method!r} must be one of {ROWS}.")
    row = comparison_configs(lemo)[method]
    plain = is_plain_lora(row)

    def build():
        model = Llama(config.with_context(seq_len), attention_backend=attention, remat=remat,
                      scan_layers=scan_layers, rngs=nnx.Rngs(0))
        model = lora.add_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
        with_placeholder_selector(model, row)
        return model if plain else group_layers(model, row)

    graphdef, lora_state, rest = nnx.split(nnx.eval_shape(build), lora.LoRAParam, ...)

    def loss(lora_state, rest, batch):
        model = nnx.merge(graphdef, lora_state, rest)
        if plain:
            return train.lm_loss(model, batch, loss_segment=loss_segment)[0]
        return lemo_loss(model, batch, lemo=row, loss_segment=loss_segment)[0]

    return loss, lora_state, rest


def lowered_lora_step(config: ModelConfig, seq_len: int, method: str, **kwargs):
    """The lowered gradient of :func:`lora_step`'s loss over the LoRA weights, on a batch of one
    ``seq_len`` row (keywords as there)."""
    loss, lora_state, rest = lora_step(config, seq_len, method, **kwargs)
    ints = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(lora_state, rest, AbstractBatch(ints, ints, ints))


def selection_model(smoke: bool):
    """``(model, tokenizer, name)`` of the selection benchmarks: SmolLM2-135M (its shipped selector
    attached), or with ``smoke`` a tiny random model with a byte tokenizer."""
    if smoke:
        class Bytes:
            def encode(self, text):
                return type("Enc", (), {"ids": list(text.encode("utf-8"))})()

        config = preset("tiny")  # vocab 256: bytes
        model = Llama(config, rngs=nnx.Rngs(0))
        learned_selector.attach(model, learned_selector.LearnedSelector(  # untrained: runs, means nothing
            config.n_layers, config.d_model, layers=range(config.n_layers)))
        return model, Bytes(), "tiny"
    from tokensparse import zoo

    model, _, tokenizer = zoo.load("smollm2-135m")
    return model, tokenizer, "smollm2-135m"
