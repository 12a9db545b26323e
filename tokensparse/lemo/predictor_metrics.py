"""Held-out quality of LeMo's predictors: how well predicted column scores rank the oracle's blocks.

Recall of the oracle's kept set at a keep ratio, ``|TopK(ĉ) ∩ TopK(c)| / K`` with
K = floor(ratio · n_b) (the library's definition of recall), and the Spearman correlation of ĉ
with c, per window row.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
import scipy.stats

from tokensparse import routing
from tokensparse.lemo import scoring
from tokensparse.lemo.predictor import LeMoPredictors, predict, predicted_column_scores
from tokensparse.lemo.targets import TargetCache


def recall_at(pred: np.ndarray, oracle: np.ndarray, keep_ratio: float) -> float:
    """|TopK(pred) ∩ TopK(oracle)| / K for one row of block scores, K = floor(keep_ratio · n_b)
    (at least 1). Ties break towards the lower block index, as selection does."""
    k = routing.capacity(len(oracle), keep_ratio, rounding="floor")
    return len(_top(pred, k) & _top(oracle, k)) / k


def _top(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k].tolist())


def spearman(pred: np.ndarray, oracle: np.ndarray) -> float:
    rho = scipy.stats.spearmanr(pred, oracle).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def recall_under_noise(oracle: np.ndarray, sigma: float, keep_ratio: float,
                       rng: np.random.Generator, draws: int = 8) -> tuple[float, float]:
    """(mean recall@``keep_ratio``, mean Spearman) of a predictor that gets one row's oracle column
    scores exactly but for Gaussian noise of ``sigma`` times their spread over the blocks: the
    prediction accuracy a recall target demands on this data. Mean over ``draws`` noise draws."""
    oracle = np.asarray(oracle, np.float64)
    spread = oracle.std() or 1.0
    noisy = [oracle + sigma * spread * rng.standard_normal(oracle.shape) for _ in range(draws)]
    return (float(np.mean([recall_at(n, oracle, keep_ratio) for n in noisy])),
            float(np.mean([spearman(n, oracle) for n in noisy])))


def evaluate(predictors: LeMoPredictors, cache: TargetCache, indices: Sequence[int],
             keep_ratio: float) -> dict[str, dict[str, float]]:
    """Per layer, mean recall@``keep_ratio`` and Spearman of ĉ against the oracle's c."""
    scores = jax.jit(lambda params, x: predicted_column_scores(*predict(
        params, x, n_heads=predictors.model_shape[1], block_size=predictors.block_size)))

    params = predictors.params()
    recall: dict[str, list[float]] = {}
    rho: dict[str, list[float]] = {}
    for index in indices:
        targets = cache(index)
        for layer, (x, tiles) in targets.items():
            if layer not in params:
                continue
            pred = np.asarray(scores(params[layer], x))
            oracle = np.asarray(scoring.column_scores(tiles), np.float64)
            for row_pred, row_oracle in zip(pred, oracle, strict=True):
                recall.setdefault(layer, []).append(recall_at(row_pred, row_oracle, keep_ratio))
                rho.setdefault(layer, []).append(spearman(row_pred, row_oracle))
    return {"recall": {k: float(np.mean(v)) for k, v in recall.items()},
            "spearman": {k: float(np.mean(v)) for k, v in rho.items()}}
