"""How far is each LeMo MLP backward from the exact one? Cosine of the LoRA gradients it gives
against the exact MLP backward's, on real training windows of a base model, attention dense.

    python scripts/mlp_backward_fidelity.py [--base=smollm2-135m] [--seq_len=2048] [--windows=1]
        [--drops=0.5,0.8]

Variants:
- ``channel_sparse_bwd@p``: the library's channel-sparse backward (LeMo's MLP) dropping fraction p;
- ``recompute``: the library's recomputed MLP (exact: cosine 1 up to rounding);
- ``per_token@p`` / ``per_token_equal_memory@p``: a what-if, not in the library: each token keeps
  its own top channels by |silu(g)| + |v| (C of them, or 2C/3, which with 16-bit channel indices
  saves as many bytes as the shared channel set's 2C values).

The adapters' B matrices start at zero, which makes the A gradients zero, so every adapter is set
to small random values (seeded) first. Prints JSON: per variant the cosine of all LoRA gradients
together, the norm ratio (variant / exact) and the per-layer cosines, averaged over the windows.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse import data, lora, train
from tokensparse.config import LeMoConfig, LoRAConfig
from tokensparse.lemo import mlp as lemo_mlp
from tokensparse.lemo.forward import lemo_loss
from tokensparse.pipelines.base import load_base


def _randomised_lora(model, seed: int):
    model = lora.add_lora(model, LoRAConfig(rank=8, alpha=16.0), rngs=nnx.Rngs(seed))
    leaves, tree = jax.tree.flatten(lora.lora_state(model))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]))
    return model


def _per_token_swiglu(keep: int):
    """SwiGLU whose backward keeps each token's own ``keep`` largest |silu(g)| + |v| channels."""

    @jax.custom_vjp
    def f(x, w_gate, w_up, w_down):
        return lemo_mlp._forward(x, w_gate, w_up, w_down)[0]

    def fwd(x, w_gate, w_up, w_down):
        out, g, v = lemo_mlp._forward(x, w_gate, w_up, w_down)
        return out, (g, v, w_gate, w_up, w_down)

    def bwd(residuals, grad_out):
        g, v, w_gate, w_up, w_down = residuals
        importance = jnp.abs(jax.nn.silu(g)) + jnp.abs(v)
        threshold = jax.lax.top_k(importance, keep)[0][..., -1:]
        delta = jnp.dot(grad_out, w_down.T) * (importance >= threshold)
        grad_g = delta * v * lemo_mlp._silu_grad(g)
        return jnp.dot(grad_g, w_gate.T) + jnp.dot(delta * jax.nn.silu(g), w_up.T), None, None, None

    f.defvjp(fwd, bwd)
    return f


def _per_token_loss(model, batch, keep: int):
    """The dense LoRA loss (:func:`train.lm_loss`) with every MLP's backward replaced by
    :func:`_per_token_swiglu`."""
    swiglu = _per_token_swiglu(keep)

    def layer_fn(block, h, layer, selection):
        h, normed = block.attend_and_norm(h, layer.positions, layer.segment_ids, selection)
        m = block.mlp
        weights = [p.kernel[...] for p in (m.gate_proj, m.up_proj, m.down_proj)]
        return block.feed_forward(h, normed, lambda u, w=weights: swiglu(u, *w)), None

    def hidden(model, tokens, positions, segment_ids):
        return model.hidden_states(tokens, positions, segment_ids, layer_fn=layer_fn)

    return train.lm_loss(model, batch, hidden_fn=hidden)[0]


def _lora_grad_fn(loss_fn):
    """A compiled ``(model, batch) -> LoRA gradients as flat float64 arrays`` (one compile)."""
    grad = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora.LoRAParam)))
    return lambda model, batch: [np.asarray(x, np.float64).ravel()
                                 for x in jax.tree.leaves(grad(model, batch))]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def compare(exact: list[np.ndarray], approx: list[np.ndarray], n_layers: int) -> dict:
    per_layer = len(exact) // n_layers  # the leaves come layer by layer
    layers = [slice(i * per_layer, (i + 1) * per_layer) for i in range(n_layers)]
    whole = (np.concatenate(approx), np.concatenate(exact))
    return {"cosine": _cosine(*whole),
            "norm_ratio": float(np.linalg.norm(whole[0]) / np.linalg.norm(whole[1])),
            "layer_cosine": [_cosine(np.concatenate(approx[s]), np.concatenate(exact[s])) for s in layers]}


def variants(drops: list[float], ffn_dim: int) -> dict:
    """name -> loss_fn(model, batch) of every variant."""
    out = {}
    for p in drops:
        lemo = LeMoConfig(keep_ratio=1.0, schedule="all", mlp_drop=p)
        out[f"channel_sparse_bwd@{p:g}"] = functools.partial(_lemo_loss, lemo=lemo)
    out["recompute"] = functools.partial(_lemo_loss, lemo=LeMoConfig(keep_ratio=1.0, schedule="all",
                                                                      mlp_mode="recompute"))
    for p in drops:
        keep = lemo_mlp.keep_channels(ffn_dim, p)
        out[f"per_token@{p:g}"] = functools.partial(_per_token_loss, keep=keep)
        out[f"per_token_equal_memory@{p:g}"] = functools.partial(_per_token_loss,
                                                                 keep=max(1, 2 * keep // 3))
    return out


def _lemo_loss(model, batch, lemo):
    return lemo_loss(model, batch, lemo=lemo)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m",
                        help="anything tokensparse.pipelines.base.load_base takes")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--drops", default="0.5,0.8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    drops = [float(p) for p in args.drops.split(",")]
    if args.seq_len % 64 or args.windows < 1 or not all(0.0 <= p < 1.0 for p in drops):
        parser.error("--seq_len must be a multiple of 64, --windows >= 1, --drops in [0, 1).")

    model, config, tokenizer = load_base(args.base)
    model = _randomised_lora(model, args.seed)
    corpus = data.load_corpus("shakespeare")
    windows = data.WindowBatches(data.encode_documents(tokenizer, corpus.train), batch_size=1,
                                 seq_len=args.seq_len, seed=args.seed + 1)
    exact_grads = _lora_grad_fn(functools.partial(
        _lemo_loss, lemo=LeMoConfig(keep_ratio=1.0, schedule="all", mlp_mode="dense")))
    grad_fns = {name: _lora_grad_fn(fn) for name, fn in variants(drops, config.ffn_dim).items()}
    results: dict[str, list[dict]] = {}
    for w in range(args.windows):
        batch = windows.batch(w)
        exact = exact_grads(model, batch)
        for name, grads in grad_fns.items():
            results.setdefault(name, []).append(compare(exact, grads(model, batch), config.n_layers))
    summary = {name: {"cosine": float(np.mean([r["cosine"] for r in rows])),
                      "norm_ratio": float(np.mean([r["norm_ratio"] for r in rows])),
                      "layer_cosine": np.mean([r["layer_cosine"] for r in rows], 0).round(4).tolist()}
               for name, rows in results.items()}
    print(json.dumps({"base": args.base, "seq_len": args.seq_len, "windows": args.windows,
                      "ffn_dim": config.ffn_dim, "d_model": config.d_model, "variants": summary},
                     indent=1))


if __name__ == "__main__":
    main()
