"""Loop-aware matmul FLOPs against analytic counts (XLA's own cost analysis counts a loop body once)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tokensparse.config import preset
from tokensparse.flops import compiled_flops
from tokensparse.llama import Llama

L, M, D = 5, 4, 16


def _scanned(w, x):
    def body(h, wi):
        return jnp.tanh(h @ wi), None
    return jax.lax.scan(body, x, w)[0].sum()


def _args():
    return jnp.ones((L, D, D)), jnp.ones((M, D))


def test_scan_body_is_counted_once_per_iteration():
    compiled = jax.jit(_scanned).lower(*_args()).compile()
    assert compiled_flops(compiled) == 2 * L * M * D * D
    assert compiled.cost_analysis()["flops"] < 2 * L * M * D * D  # what the fix is for


def test_scanned_backward_counts_both_gradient_matmuls_per_layer():
    compiled = jax.jit(jax.grad(_scanned)).lower(*_args()).compile()
    # forward h @ w, backward dh @ w.T and h.T @ dh, in every one of the L iterations
    assert compiled_flops(compiled) == 3 * 2 * L * M * D * D


def test_nested_loops_multiply():
    def f(w, x):
        def outer(h, _):
            return jax.lax.scan(lambda h, wi: (h @ wi, None), h, w)[0], None
        return jax.lax.scan(outer, x, None, length=3)[0].sum()
    assert compiled_flops(jax.jit(f).lower(*_args()).compile()) == 3 * 2 * L * M * D * D


@pytest.mark.parametrize("scan_layers", [True, False])
def test_llama_forward_matches_the_analytic_count(scan_layers):
    cfg = preset("tiny").replace(n_layers=3)
    model = Llama(cfg, attention_backend="reference", scan_layers=scan_layers, rngs=nnx.Rngs(0))
    t = 32
    tokens = jnp.zeros((1, t), jnp.int32)
    got = compiled_flops(nnx.jit(lambda m, x: m(x)).lower(model, tokens).compile())
    linear = 2 * (cfg.d_model * cfg.q_dim + 2 * cfg.d_model * cfg.kv_dim + cfg.q_dim * cfg.d_model
                  + 3 * cfg.d_model * cfg.ffn_dim)
    scores = 4 * cfg.n_heads * cfg.head_dim  # q·kᵀ and p·v per (query, key) pair, no causal skip
    head = 2 * cfg.d_model * cfg.vocab_size
    assert got == cfg.n_layers * (t * linear + scores * t * t) + t * head
