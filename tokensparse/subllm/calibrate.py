"""Per-level inference thresholds θ calibrated to target keep rates on sample tokens.

A trained SUBLLM's Balancer puts about ``keep`` of each level's scores above 0, so the spec's θ = 0
keeps the intended fraction at every level. An untrained (or briefly trained) model does not: with
random weights about half the scores are positive, and one θ fitted on level 1 lets a deeper level
keep 0.80–0.87 of its input instead of its ratio. :func:`calibrate_thresholds` fits one θ per
nesting level, outermost first: level l's scores are computed on the tokens levels 1..l-1 kept
(with their fitted θ's), so each θ is fitted to the stream it will actually see at inference.
Subsamplers at the same level share one θ, fitted on their pooled scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import parse_structure


@nnx.jit
def _infer_aux(model: SubLLM, tokens, segment_ids):
    _, aux = model.forward(tokens, segment_ids=segment_ids, mode="infer")
    return aux["scores"], aux["segment_ids"]


def calibrate_thresholds(model: SubLLM, tokens: Int[Array, "b t"],
                         keep: float | Sequence[float] | None = None,
                         segment_ids: Int[Array, "b t"] | None = None) -> tuple[float, ...]:
    """One θ per nesting level such that, on ``tokens``, each level keeps ``keep[l]`` of its valid
    input tokens (default: the structure's keep ratios; capacity as configured). Returns the θ's
    outermost first, ready for ``SubLLMConfig.infer_threshold``; ``model`` is left unchanged."""
    structure = model.structure
    ratios = structure.keep if keep is None else parse_structure(structure.text, keep).keep
    tokens = np.asarray(tokens, np.int32)
    segment_ids = np.zeros(tokens.shape, np.int32) if segment_ids is None else np.asarray(segment_ids)
    levels = [op.level for op in structure.ops if op.kind == "down"]
    parents = _parents(structure)
    config = model.subllm_config
    thetas: list[float] = [float("inf")] * structure.depth  # levels not fitted yet keep nothing
    try:
        for level, ratio in enumerate(ratios, start=1):
            model.subllm_config = config.replace(infer_threshold=tuple(thetas))
            scores, segs = _infer_aux(model, tokens, segment_ids)
            pooled = []
            for j, lev in enumerate(levels):
                if lev == level:
                    parent_seg = segment_ids if parents[j] is None else np.asarray(segs[parents[j]])
                    pooled.append(np.asarray(scores[j])[parent_seg >= 0])
            values = np.concatenate(pooled)
            if values.size == 0:
                raise ValueError(f"calibrate_thresholds: level {level} received no tokens; give more "
                                 "tokens or larger keep ratios.")
            thetas[level - 1] = float(np.quantile(values, 1.0 - ratio))
    finally:
        model.subllm_config = config
    return tuple(thetas)


def _parents(structure) -> list[int | None]:
    """For each subsampler, the subsampler whose kept stream it scores (None: the full stream)."""
    out: list[int | None] = []
    open_: list[int] = []
    for op in structure.ops:
        if op.kind == "down":
            out.append(open_[-1] if open_ else None)
            open_.append(op.index)
        elif op.kind == "up":
            open_.pop()
    return out
