"""Does the predictor's input layout limit its recall? Train the spec's predictor paths on stored
targets with X cut into ``H`` head slices (the spec: each path sees ``block · D/H`` values, weights
shared by all slices) and, for comparison, into fewer, wider slices (``--slices=1``: each block's
whole ``block · D`` input), then score held-out recall@keep of each.

    python scripts/predictor_input_slices.py TARGETS_DIR [--layers=21,26] [--slices=9,1]
        [--windows=192] [--steps=400] [--eval_windows=16] [--lr=3e-4] [--loss=column]

TARGETS_DIR holds ``train/`` and ``held_out/`` target directories written by
:class:`tokensparse.lemo.targets.TargetCache` (a predictor run's ``targets_dir``); no model is
loaded. Training: ``--loss`` (``column``; ``smooth_l1``, the spec's tile loss; or ``mse``), AdamW
with 20 warm-up steps, batch one window, no pruning; widths h1 = 128 and h2 = block · head_dim (the
spec's) for every layout, output head_dim. Prints JSON: per layout, per-layer held-out recall, its
mean and the parameter count of one path.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse.lemo import predictor, scoring
from tokensparse.lemo import predictor_metrics as pm
from tokensparse.lemo import predictor_training as pt
from tokensparse.lemo.targets import load_targets


def _windows(directory: pathlib.Path, count: int, layers: list[str]) -> list[dict]:
    files = sorted(directory.glob("[0-9]*.npz"))[:count]
    if len(files) < count:
        raise SystemExit(f"{directory} holds {len(files)} windows; --windows/--eval_windows asks "
                         f"for {count}.")
    out = []
    for f in files:
        targets, _ = load_targets(f, layers)
        missing = [layer for layer in layers if layer not in targets]
        if missing:
            raise SystemExit(f"{f} has no targets for layers {missing}.")
        out.append({layer: targets[layer] for layer in layers})
    return out


def run_layout(train, held_out, layers, *, slices: int, head_dim: int, block: int, d_model: int,
               steps: int, lr: float, keep: float, loss: str = "column", seed: int = 0) -> dict:
    in_dim = block * d_model // slices
    h2 = block * head_dim  # the spec's b·d for every layout: only the input differs
    rngs = nnx.Rngs(seed)
    params = {layer: {side: predictor.PredictorPath(in_dim, (128, h2), head_dim, rngs=rngs).weights()
                      for side in predictor.PATHS} for layer in layers}
    tc = pt.PredictorTrainConfig(lr=lr, loss=loss, prune_every=0)
    tx = pt.make_optimizer(tc)
    step = pt.make_step(tx, n_heads=slices, block_size=block, dtype=jnp.float32, loss=loss)
    opt_state, zeros = tx.init(params), pt.zero_counters(params)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, zeros, final, _ = step(params, opt_state, zeros, train[i % len(train)])
    train_s = time.perf_counter() - start
    scores = jax.jit(lambda p, x: predictor.predicted_column_scores(
        *predictor.predict(p, x, n_heads=slices, block_size=block)))
    recall = {layer: float(np.mean([
        pm.recall_at(np.asarray(scores(params[layer], w[layer][0]))[0],
                     np.asarray(scoring.column_scores(w[layer][1]), np.float64)[0], keep)
        for w in held_out])) for layer in layers}
    return {"slices": slices, "input_width": in_dim, "final_loss": float(final),
            "params_per_path": sum(int(np.prod(x.shape)) for x in params[layers[0]]["q"].values()),
            "recall": recall, "mean_recall": float(np.mean(list(recall.values()))),
            "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets_dir", type=pathlib.Path)
    parser.add_argument("--layers", default="21,26")
    parser.add_argument("--slices", default="", help="comma-separated; default: H,1")
    parser.add_argument("--windows", type=int, default=192)
    parser.add_argument("--eval_windows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--loss", choices=pt.LOSSES, default="column")
    args = parser.parse_args()
    manifest = json.loads((args.targets_dir / "train" / "manifest.json").read_text())
    model, block = manifest["model"], manifest["block_size"]
    layers = [s.strip() for s in args.layers.split(",")]
    slices = [int(s) for s in args.slices.split(",")] if args.slices else [model["n_heads"], 1]
    bad = [s for s in slices if s < 1 or model["d_model"] % s]
    if bad:
        raise SystemExit(f"--slices {bad} must divide d_model={model['d_model']}.")
    train = _windows(args.targets_dir / "train", args.windows, layers)
    held_out = _windows(args.targets_dir / "held_out", args.eval_windows, layers)
    results = [run_layout(train, held_out, layers, slices=s, head_dim=model["head_dim"],
                          block=block, d_model=model["d_model"], steps=args.steps, lr=args.lr,
                          keep=args.keep, loss=args.loss) for s in slices]
    print(json.dumps({"layers": layers, "loss": args.loss, "windows": args.windows,
                      "eval_windows": args.eval_windows, "steps": args.steps, "layouts": results},
                     indent=1))


if __name__ == "__main__":
    main()
