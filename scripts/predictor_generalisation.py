"""Do trained LeMo predictors generalise? Recall@keep on training windows, on held-out windows, and
that of a position-only prior (each layer's mean standardised column-score profile over the
training windows, the same ranking for every input).

    python scripts/predictor_generalisation.py PREDICTOR_WORKDIR [--train_windows=16]

PREDICTOR_WORKDIR is a finished ``experiments.train_predictors`` (or ``lemo_predictor``) run; its
config.json names the base, context, windows and keep ratio. Prints JSON: mean recalls over the
default schedule's sparse layers, and per layer ``[train, held-out, position prior]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # experiments/: the repository
from experiments import run_configs
from tokensparse.lemo import predictor, scoring
from tokensparse.lemo import predictor_metrics as pm
from tokensparse.lemo import predictor_training as pt
from tokensparse.pipelines import predictors as pipeline


def standardise(c: np.ndarray) -> np.ndarray:
    return (c - c.mean()) / (c.std() + 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--train_windows", type=int, default=16)
    args = parser.parse_args()
    run = run_configs.predictors_config(
        json.loads((pathlib.Path(args.workdir) / "config.json").read_text())["experiment"])
    tc = run.train
    model, config, train, held_out = pipeline.predictor_setup(run)  # the run's own windows
    predictors = predictor.load_predictors(f"{args.workdir}/predictors", config)
    start = time.perf_counter()
    stored = pt.targets_directory(tc, args.workdir)  # the run's own targets, when still there
    train_cache = pt.TargetCache(model, train, predictors.layer_ids, tc.block_size,
                                 directory=stored / "train")
    held_cache = pt.TargetCache(model, held_out, predictors.layer_ids, tc.block_size,
                                directory=stored / "held_out")
    n_train = min(args.train_windows, tc.train_windows)
    profiles: dict[str, list[np.ndarray]] = {}
    for i in range(n_train):
        for layer, (_, tiles) in train_cache(i).items():
            c_scores = np.asarray(scoring.column_scores(tiles), np.float64)[0]
            profiles.setdefault(layer, []).append(standardise(c_scores))
    prior = {layer: np.mean(v, axis=0) for layer, v in profiles.items()}
    on_train = pm.evaluate(predictors, train_cache, range(n_train), tc.keep_ratio)["recall"]
    on_held = pm.evaluate(predictors, held_cache, range(tc.eval_windows), tc.keep_ratio)["recall"]
    by_position: dict[str, list[float]] = {}
    for i in range(tc.eval_windows):
        for layer, (_, tiles) in held_cache(i).items():
            c_scores = np.asarray(scoring.column_scores(tiles), np.float64)[0]
            by_position.setdefault(layer, []).append(pm.recall_at(prior[layer], c_scores, tc.keep_ratio))
    sparse = pipeline.predictor_sparse_layers(config, tc, on_held)
    key = f"@{tc.keep_ratio:g}"
    print(json.dumps({
        f"train_recall{key}": float(np.mean([on_train[i] for i in sparse])),
        f"heldout_recall{key}": float(np.mean([on_held[i] for i in sparse])),
        f"position_prior_recall{key}": float(np.mean([np.mean(by_position[i]) for i in sparse])),
        "train_windows_scored": n_train, "eval_windows": tc.eval_windows, "sparse_layers": sparse,
        "per_layer": {layer: [round(on_train[layer], 3), round(on_held[layer], 3),
                              round(float(np.mean(by_position[layer])), 3)]
                      for layer in sorted(on_held, key=int)},
        "seconds": time.perf_counter() - start}, indent=1))


if __name__ == "__main__":
    main()
