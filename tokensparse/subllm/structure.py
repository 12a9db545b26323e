"""SUBLLM structure strings and configuration.

The structure string of the published SUBLLM (see docs/subllm.md#sources). A structure such as
``TTTTT(TTTTT(TTTT)TTTTT)TTTTT`` reads left to right: ``T`` is one decoder layer, ``(`` a subsampler (scorer +
selection), ``)`` the matching upsampler followed by a bypass. Parsing turns it into a flat list of ops in
execution order, so the model's forward is one loop with a stack, whatever the nesting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from tokensparse.config import ModelConfig, preset
from tokensparse.subllm.balancer import GRAD_SCALE, STATISTICS

LEVEL_POSITIONS = ("composed", "parent")
INITS = ("spec", "backbone")


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the forward.

    ``kind="layer"``: decoder layer ``index`` running at nesting ``level`` (0 = full length).
    ``kind="down"``: subsampler ``index`` (in order of its ``(``), leading into ``level`` with ``keep``.
    ``kind="up"``: upsample + bypass closing subsampler ``index``, returning to ``level``.
    """

    kind: Literal["layer", "down", "up"]
    index: int
    level: int
    keep: float | None = None


@dataclasses.dataclass(frozen=True)
class Structure:
    """A parsed structure string: ops in execution order and the keep ratio of each nesting level."""

    text: str
    ops: tuple[Op, ...]
    keep: tuple[float, ...]  # keep[l - 1] is the per-level keep ratio of level l (relative to l - 1)

    @property
    def n_layers(self) -> int:
        return sum(op.kind == "layer" for op in self.ops)

    @property
    def levels(self) -> tuple[int, ...]:
        """Nesting level of each layer, in layer order."""
        return tuple(op.level for op in self.ops if op.kind == "layer")

    @property
    def n_subsamplers(self) -> int:
        return sum(op.kind == "down" for op in self.ops)

    @property
    def depth(self) -> int:
        """Number of nesting levels (0 for a dense structure)."""
        return len(self.keep)


def _nesting_depth(s: str) -> int:
    depth = best = 0
    for pos, ch in enumerate(s):
        if ch not in "T()":
            raise ValueError(f"Structure {s!r} has {ch!r} at position {pos}; only 'T', '(' and ')' "
                             "are allowed.")
        if ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            if depth == 0:
                raise ValueError(f"Structure {s!r} has an unmatched ')' at position {pos}.")
            depth -= 1
    if depth:
        raise ValueError(f"Structure {s!r} has {depth} unclosed '('; add the matching ')'.")
    return best


def _keep_per_level(keep: float | Sequence[float], depth: int) -> tuple[float, ...]:
    if isinstance(keep, int | float):
        ratios = (float(keep),) * depth
    else:
        ratios = tuple(float(r) for r in keep)
        if len(ratios) != depth:
            raise ValueError(f"keep has {len(ratios)} ratios but the structure has {depth} nesting "
                             "levels; give one ratio per level or a single float.")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad or (depth == 0 and isinstance(keep, int | float) and not 0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep ratios must be in (0, 1], got {bad or [keep]}.")
    return ratios


def parse_structure(s: str, keep: float | Sequence[float] = 0.64) -> Structure:
    """Parse ``s`` (e.g. ``"TTTTT(TTTTT(TTTT)TTTTT)TTTTT"``) with ``keep`` per level (float or list)."""
    if not isinstance(s, str) or not s:
        raise ValueError(f"Structure must be a non-empty string of 'T', '(' and ')', got {s!r}.")
    depth = _nesting_depth(s)
    ratios = _keep_per_level(keep, depth)
    ops: list[Op] = []
    stack: list[tuple[int, int]] = []  # (subsampler index, layers seen when it opened)
    n_layers = n_down = 0
    for pos, ch in enumerate(s):
        level = len(stack)
        if ch == "T":
            ops.append(Op("layer", n_layers, level))
            n_layers += 1
        elif ch == "(":
            ops.append(Op("down", n_down, level + 1, ratios[level]))
            stack.append((n_down, n_layers))
            n_down += 1
        else:
            index, layers_at_open = stack.pop()
            if layers_at_open == n_layers:
                raise ValueError(f"Structure {s!r} has an empty '()' ending at position {pos}; a "
                                 "subsampled level needs at least one 'T'.")
            ops.append(Op("up", index, level - 1))
    if n_layers == 0:
        raise ValueError(f"Structure {s!r} has no layers; add at least one 'T'.")
    return Structure(text=s, ops=tuple(ops), keep=ratios)


@dataclasses.dataclass(frozen=True)
class SubLLMConfig:
    """A SUBLLM: the dense backbone ``model`` plus its structure and routing options."""

    model: ModelConfig
    """The dense backbone; its n_layers must equal the structure's number of T's."""
    structure: str
    """Structure string: T is a decoder layer, ( a subsampler, ) its upsampler and bypass, nested
    to any depth (e.g. TTT(TT(TT)TT)TTT)."""
    keep: float | tuple[float, ...] = 0.64
    """Keep ratio in (0, 1] of every nesting level, or one per level (outermost first), each
    relative to the level above."""
    discard_penalty: bool = True
    """Training subtracts the best discarded tokens' weights from the kept ones' (icefall's discard
    penalty in its training selection), which pushes the discarded scores below 0."""
    infer_threshold: float | tuple[float, ...] = 0.0
    """Inference (threshold mode) keeps a token when its score exceeds this (the spec's 0), or one
    threshold per nesting level (outermost first; see tokensparse.subllm.calibrate)."""
    infer_capacity: float = 1.0
    """Inference keeps at most ceil(infer_capacity * N_in) tokens per level, first come first
    served, in (0, 1]."""
    capacity_multiple: int = 1
    """Training capacities are rounded up to a multiple of this (kernel tiling)."""
    level_positions: str = "composed"
    """composed: a token keeps its original position at every level; parent: below level 1 its
    position is its rank among the parent level's tokens (the official prefill convention)."""
    route_shards: int = 0
    """Training and top-k selection pick per this many contiguous pieces of the sequence; 0: the
    mesh's seq axis (global top-k on one device). See tokensparse.routing.per_shard."""
    balancer_statistic: str = "mean_std"
    """What the Balancer's location term measures: mean_std (the spec's Gaussian mean/std band) or
    proportion (the fraction of positive scores); see tokensparse.subllm.balancer.balancer_penalty."""
    balancer_margin: float = 0.05
    """Half-width of the band the Balancer acts on, keep ± margin, in [0, 0.5) (the spec's 0.05)."""
    bypass_init: float = 0.5
    """Initial bypass scale c of every upsampler, in (0, 1] (the spec's 0.5)."""
    balancer_start_scale: float = GRAD_SCALE
    """The Balancer's grad_scale at step 0, in (0, 10]; it falls linearly to the spec's 0.04 by
    balancer_start_steps (tokensparse.subllm.modules.balancer_grad_scale)."""
    balancer_start_steps: int = 0
    """Steps over which the Balancer's grad_scale falls from balancer_start_scale to 0.04; 0 (the
    spec's): 0.04 throughout."""
    weight_attn_bias: bool = False
    """Attention inside a subsampled level adds log(w + 1e-3) to each key's logit, w being the key's
    selection weight (summed over the nested levels it passed): icefall's variant, spec 2.6. False
    (the spec's and the official code's): weights act only in the upsampling."""
    init: str = "spec"
    """How fresh weights are drawn: spec (the official code's: projections truncated normal at
    +-3 sigma with sigma = model.init_std, output projections scaled by 1/sqrt(2(layer+1)), the
    embedding normal with std d_model^-1/2) or backbone (the plain Llama's untruncated normal
    init_std everywhere). The dense twin is drawn the same way."""

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise ValueError("SubLLMConfig.model must be a ModelConfig.")
        if not isinstance(self.keep, int | float):
            object.__setattr__(self, "keep", tuple(float(r) for r in self.keep))
        parsed = parse_structure(self.structure, self.keep)
        if parsed.n_layers != self.model.n_layers:
            raise ValueError(f"SubLLMConfig.structure {self.structure!r} has {parsed.n_layers} layers "
                             f"but model.n_layers={self.model.n_layers}; make them agree.")
        if not isinstance(self.infer_threshold, int | float):
            object.__setattr__(self, "infer_threshold", tuple(float(t) for t in self.infer_threshold))
            if len(self.infer_threshold) != parsed.depth:
                raise ValueError(f"SubLLMConfig.infer_threshold has {len(self.infer_threshold)} values "
                                 f"but the structure has {parsed.depth} nesting levels; give one per "
                                 "level or a single float.")
        if not 0.0 < self.infer_capacity <= 1.0:
            raise ValueError(f"SubLLMConfig.infer_capacity={self.infer_capacity} must be in (0, 1].")
        if not (isinstance(self.capacity_multiple, int) and self.capacity_multiple >= 1):
            raise ValueError(f"SubLLMConfig.capacity_multiple={self.capacity_multiple!r} must be a "
                             "positive integer.")
        if not (isinstance(self.route_shards, int) and self.route_shards >= 0):
            raise ValueError(f"SubLLMConfig.route_shards={self.route_shards!r} must be an integer "
                             ">= 0 (0 follows the mesh's seq axis).")
        if not 0.0 < self.bypass_init <= 1.0:
            raise ValueError(f"SubLLMConfig.bypass_init={self.bypass_init} must be in (0, 1].")
        if not 0.0 <= self.balancer_margin < 0.5:
            raise ValueError(f"SubLLMConfig.balancer_margin={self.balancer_margin} must be in [0, 0.5).")
        if not 0.0 < self.balancer_start_scale <= 10.0:
            raise ValueError(f"SubLLMConfig.balancer_start_scale={self.balancer_start_scale} must be in "
                             "(0, 10].")
        if not (isinstance(self.balancer_start_steps, int) and self.balancer_start_steps >= 0):
            raise ValueError(f"SubLLMConfig.balancer_start_steps={self.balancer_start_steps!r} must be "
                             "an integer >= 0.")
        if self.balancer_statistic not in STATISTICS:
            raise ValueError(f"SubLLMConfig.balancer_statistic={self.balancer_statistic!r} must be one "
                             f"of {STATISTICS}.")
        if not isinstance(self.weight_attn_bias, bool):
            raise ValueError(f"SubLLMConfig.weight_attn_bias={self.weight_attn_bias!r} must be a bool.")
        if self.init not in INITS:
            raise ValueError(f"SubLLMConfig.init={self.init!r} must be one of {INITS}.")
        if self.level_positions not in LEVEL_POSITIONS:
            raise ValueError(f"SubLLMConfig.level_positions={self.level_positions!r} must be one of "
                             f"{LEVEL_POSITIONS}.")

    def level_threshold(self, level: int) -> float:
        """The inference threshold θ of nesting level ``level`` (1 = outermost subsampled level)."""
        if isinstance(self.infer_threshold, int | float):
            return float(self.infer_threshold)
        return self.infer_threshold[level - 1]

    @property
    def parsed(self) -> Structure:
        return parse_structure(self.structure, self.keep)

    def replace(self, **changes: Any) -> SubLLMConfig:
        return dataclasses.replace(self, **changes)


def dense_twin(config: SubLLMConfig) -> SubLLMConfig:
    """The same model with every layer at full length (structure ``"T"*n``): SUBLLM's baseline."""
    keep = config.keep if isinstance(config.keep, int | float) else 1.0
    threshold = config.infer_threshold if isinstance(config.infer_threshold, int | float) else 0.0
    return config.replace(structure="T" * config.model.n_layers, keep=keep, infer_threshold=threshold)


_SUBLLM_1P3B = ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                           head_dim=128, ffn_dim=5504, rms_eps=1e-5, rope_theta=10000.0,
                           max_positions=4096, tie_embeddings=False, init_std=0.006)

_SUBLLM_PRESETS: dict[str, SubLLMConfig] = {
    "subllm-1.3b": SubLLMConfig(model=_SUBLLM_1P3B, structure="TTTTT(TTTTT(TTTT)TTTTT)TTTTT"),
    "subllm-small": SubLLMConfig(model=preset("small", n_layers=12, n_kv_heads=8),
                                 structure="TTT(TT(TT)TT)TTT"),
    "subllm-tiny": SubLLMConfig(model=preset("tiny", n_layers=6, n_kv_heads=4),
                                structure="T(T(TT)T)T"),
}


def subllm_preset(name: str, **overrides: Any) -> SubLLMConfig:
    """A named SUBLLM (``subllm-1.3b``, ``subllm-small``, ``subllm-tiny``), fields optionally replaced."""
    if name not in _SUBLLM_PRESETS:
        raise ValueError(f"Unknown SUBLLM preset {name!r}; available: {sorted(_SUBLLM_PRESETS)}.")
    config = _SUBLLM_PRESETS[name]
    return config.replace(**overrides) if overrides else config


def subllm_preset_names() -> list[str]:
    return sorted(_SUBLLM_PRESETS)
