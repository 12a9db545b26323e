"""Tiny end-to-end demo: random Llama → forward → one LoRA gradient step, with compiled memory.

    python -m experiments.demo [--preset=tiny --batch=2 --seq_len=128]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import flags
from flax import nnx

from experiments import _checks
from tokensparse import config as cfg
from tokensparse import lora
from tokensparse.llama import Llama
from tokensparse.metrics import compiled_memory

_PRESET = flags.DEFINE_enum("preset", "tiny", cfg.preset_names(), "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.", lower_bound=2)


def next_token_loss(model: Llama, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def main(argv):
    del argv
    config = cfg.preset(_PRESET.value)
    model = Llama(config, rngs=nnx.Rngs(0))
    lora.add_lora(model, cfg.LoRAConfig(), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=lora.LoRAParam)
    tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, _SEQ_LEN.value), 0,
                                config.vocab_size)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        grad_fn = nnx.value_and_grad(next_token_loss, argnums=nnx.DiffState(0, lora.LoRAParam))
        loss, grads = grad_fn(model, tokens)
        optimizer.update(model, grads)
        return loss

    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam)))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    n_lora = sum(x.size for x in jax.tree.leaves(lora.lora_state(model)))
    print(f"preset={_PRESET.value} params={n_base:,} (LoRA {n_lora:,}) backend={jax.default_backend()}")
    print(f"tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")
    cost = compiled_memory(train_step, model, optimizer, tokens)
    losses = [float(train_step(model, optimizer, tokens)) for _ in range(3)]
    print("LoRA step losses: " + ", ".join(f"{x:.4f}" for x in losses))
    print(f"compiled train step: activations {cost.temp_bytes / 2**20:.2f} MiB, arguments "
          f"{cost.argument_bytes / 2**20:.2f} MiB, {cost.flops / 1e9:.3f} GFLOP")


if __name__ == "__main__":
    _checks.run(main)
