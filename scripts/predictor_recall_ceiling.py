"""How accurate must a block predictor be to reach a recall target on this data, and what do cheap
functions of the layer's exact q, k reach? On stored targets:

1. the oracle's own column scores plus Gaussian noise of ``σ`` × their spread over the blocks
   (``--noise``): the recall and Spearman a predictor with that error would score;
2. with ``--base`` (the model the targets were collected from; its weights digest is checked), the
   training-free estimators of :mod:`tokensparse.lemo.estimators`, plus ``exact``, the tile kernel
   recomputed from q, k (recall 1.0 unless the store and the model disagree).

    python scripts/predictor_recall_ceiling.py TARGETS_DIR [--split=held_out] [--windows=16]
        [--keep=0.4] [--noise=0.05,0.1,0.2,0.3,0.5] [--base=smollm2-135m] [--layers=14,21]

TARGETS_DIR holds ``train/`` and ``held_out/`` target directories written by
:class:`tokensparse.lemo.targets.TargetCache`. Prints JSON: per method, per-layer recall and
Spearman and their means over the layers.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tokensparse.lemo import estimators, scoring
from tokensparse.lemo import predictor_metrics as pm
from tokensparse.lemo.rules import pre_rope_qk
from tokensparse.lemo.targets import load_targets, weights_digest


def _summary(per_layer: dict[str, dict[str, list[float]]]) -> dict:
    recall = {layer: float(np.mean(v["recall"])) for layer, v in per_layer.items()}
    rho = {layer: float(np.mean(v["spearman"])) for layer, v in per_layer.items()}
    return {"mean_recall": float(np.mean(list(recall.values()))),
            "mean_spearman": float(np.mean(list(rho.values()))), "recall": recall, "spearman": rho}


def _load_model(base: str, manifest: dict):
    from tokensparse.pipelines.base import load_base  # the model is only needed for the estimators

    model = load_base(base)[0]
    if weights_digest(model) != manifest["weights"]:
        raise SystemExit(f"--base={base} is not the model these targets were collected from "
                         "(weights digest differs).")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets_dir", type=pathlib.Path)
    parser.add_argument("--split", default="held_out", choices=("held_out", "train"))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--noise", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--base", default="", help="model for the estimators; none: noise only")
    parser.add_argument("--layers", default="", help="comma-separated; default: every stored layer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    directory = args.targets_dir / args.split
    manifest = json.loads((directory / "manifest.json").read_text())
    layers = ([s.strip() for s in args.layers.split(",")] if args.layers
              else [str(layer) for layer in manifest["layers"]])
    unknown = sorted(set(layers) - {str(layer) for layer in manifest["layers"]})
    if unknown:
        raise SystemExit(f"layers {unknown} are not in {directory} (it holds {manifest['layers']}).")
    files = sorted(directory.glob("[0-9]*.npz"))[:args.windows]
    if len(files) < args.windows:
        raise SystemExit(f"{directory} holds {len(files)} windows; --windows asks for {args.windows}.")
    sigmas = [float(s) for s in args.noise.split(",") if s]
    model = _load_model(args.base, manifest) if args.base else None
    block = manifest["block_size"]
    noise = {f"noise{s:g}": s for s in sigmas}
    methods = list(noise)
    if model is not None:
        methods += ["exact", *estimators.ESTIMATORS]

    @jax.jit
    def estimates(q, k):
        out = {name: estimators.estimate(name, q, k, block) for name in estimators.ESTIMATORS}
        out["exact"] = scoring.column_scores(scoring.block_tiles(q, k, scoring.ScoreOptions(
            block_size=block)))
        return out

    rng = np.random.default_rng(args.seed)
    per: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in methods}

    def add(method: str, layer: str, recall: float, rho: float) -> None:
        slot = per[method].setdefault(layer, {"recall": [], "spearman": []})
        slot["recall"].append(recall)
        slot["spearman"].append(rho)

    for f in files:
        targets, _ = load_targets(f, layers)
        for layer in layers:
            x, tiles = targets[layer]
            oracle = np.asarray(scoring.column_scores(tiles), np.float64)
            for name, s in noise.items():
                for row in oracle:
                    add(name, layer, *pm.recall_under_noise(row, s, args.keep, rng))
            if model is not None:
                found = estimates(*pre_rope_qk(model.layers[int(layer)], jnp.asarray(x)))
                for name, scores in found.items():
                    for row_pred, row in zip(np.asarray(scores), oracle, strict=True):
                        add(name, layer, pm.recall_at(row_pred, row, args.keep),
                            pm.spearman(row_pred, row))
    print(json.dumps({"split": args.split, "windows": args.windows, "keep": args.keep,
                      "layers": layers, "methods": {m: _summary(per[m]) for m in methods}},
                     indent=1))


if __name__ == "__main__":
    main()
