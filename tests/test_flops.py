"""Loop-aware matmul FLOPs against analytic counts (XLA's own cost analysis counts a loop body once)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tokensparse.config import preset
from tokensparse.flops import CategoryRule, categorised_flops, compiled_flops
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


# -- categories --------------------------------------------------------------------------------------

def _alpha(x, w):
    return jnp.tanh(x @ w)


def _beta(x, w):
    return x @ w.T


def test_categories_follow_the_python_stack_through_loops():
    rules = (CategoryRule("a", functions=("_alpha",)), CategoryRule("b", functions=("_beta",)))

    def f(w, x):
        def body(h, wi):
            return _beta(_alpha(h, wi), wi), None
        return jax.lax.scan(body, x, w)[0].sum()

    compiled = jax.jit(f).lower(*_args()).compile()
    got = categorised_flops(compiled, rules)
    assert got.by_category["a"] == got.by_category["b"] == L * 2 * M * D * D
    assert got.total == compiled_flops(compiled) == 2 * L * 2 * M * D * D
    assert not any(got.conditional.values())


def test_a_conditional_counts_its_largest_branch_and_says_so():
    def f(w, x):
        return jax.lax.cond(x.sum() > 0, lambda: _alpha(x, w[0]) @ w[1], lambda: x).sum()

    got = categorised_flops(jax.jit(f).lower(*_args()).compile(),
                            (CategoryRule("a", functions=("_alpha",)),))
    assert got.by_category["a"] == got.conditional["a"] == 2 * M * D * D
    assert got.by_category["other"] == got.conditional["other"] == 2 * M * D * D


@pytest.fixture(scope="module")
def tiny_steps():  # four compiles of the tiny LoRA step: the tests using it are slow
    """Categorised FLOPs of the tiny LoRA step (chunked attention) and LeMo's elimination row."""
    from experiments.bench.inputs import lowered_lora_step
    from tokensparse.config import LeMoConfig

    # The spec's oracle and pass-through, whose FLOPs the hand counts below know (the learned rule's
    # last matvec, 2·t·64 FLOPs per layer, compiles without the scope's metadata: it lands in
    # "other"; the default fill's FLOPs are counted in test_lemo_fill.py).
    cfg, lemo = preset("tiny"), LeMoConfig(selector="oracle", keep_first_block=False,
                                           eliminated="pass")
    return cfg, {(method, remat): categorised_flops(lowered_lora_step(
        cfg, 512, method, lemo=lemo, remat=remat, attention="chunked").compile())
        for method in ("lora", "lemo_elimination") for remat in ("none", "full")}


@pytest.mark.slow
def test_lora_step_categories_match_hand_counts(tiny_steps):
    cfg, steps = tiny_steps
    t, d, f, layers = 512, cfg.d_model, cfg.ffn_dim, cfg.n_layers
    for remat, recomputed in (("none", 0), ("full", 1)):
        got = steps["lora", remat]
        assert got.total == sum(got.by_category.values())
        assert got.by_category["other"] == got.by_category["selection"] == 0
        # MLP: 3 matmuls forward, 3 input gradients (frozen weights), and with full remat gate and
        # up recomputed (the down projection's output is never read in the backward).
        assert got.by_category["mlp"] == layers * 2 * t * d * f * (3 + 3 + 2 * recomputed)
        # Head: logits recomputed per loss segment in the backward, then the input gradient.
        assert got.by_category["head"] == 2 * 2 * t * d * cfg.vocab_size
        # Core: q·kᵀ and p·v forward over every tile, 5 matmuls backward (flash: scores again).
        core = 2 * 2 * t * t * cfg.n_heads * cfg.head_dim
        assert got.by_category["attention"] == layers * core * (3.5 + recomputed)
        assert got.conditional["attention"] == got.by_category["attention"]  # skippable tiles
        # Projections: forward and input gradients at least; at most every projection and adapter
        # matmul three times (+1 with remat): the o projection may be recomputed in the backward.
        base = 2 * t * d * (2 * cfg.q_dim + 2 * cfg.kv_dim)  # q, k, v, o forward
        adapters = 2 * t * 8 * (4 * d + 2 * cfg.q_dim + 2 * cfg.kv_dim)  # LoRA r=8 forward
        assert (2 * layers * base < got.by_category["projections"]
                < (3 + recomputed) * layers * (base + adapters))


@pytest.mark.slow
def test_elimination_moves_projection_and_attention_flops_to_selection(tiny_steps):
    cfg, steps = tiny_steps
    for remat in ("none", "full"):
        lora, lemo = steps["lora", remat], steps["lemo_elimination", remat]
        assert lemo.by_category["selection"] > 0 and lemo.by_category["other"] == 0
        assert lemo.by_category["mlp"] == lora.by_category["mlp"]
        assert lemo.by_category["head"] == lora.by_category["head"]
        # layer 0 of 2 keeps floor(0.4 · 8) = 3 of 8 blocks: 192 tokens, (192/512)² of its core
        per_layer = lora.by_category["attention"] / cfg.n_layers
        assert lemo.by_category["attention"] == pytest.approx(per_layer * (1 + (192 / 512) ** 2))
        assert lemo.by_category["projections"] < lora.by_category["projections"]
