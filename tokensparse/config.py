"""Frozen, validated configuration dataclasses and named presets.

Configs are plain data: hashable (usable as static jit arguments), comparable, and round-trip through
``to_dict`` / ``from_dict`` so experiments can write them next to checkpoints. Validation happens in
``__post_init__`` and every message says which field to change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")
ROPE_KINDS = ("none", "linear", "llama3")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are adapted to a longer context.

    ``none`` keeps the base frequencies; ``linear`` divides positions by ``factor`` (position
    interpolation, what LeMo fine-tuning uses); ``llama3`` rescales only the low frequencies, as in
    Llama 3.1, using ``low_freq_factor``, ``high_freq_factor`` and ``original_max_positions``.
    """

    kind: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self):
        _check(
            self.kind in ROPE_KINDS,
            f"RopeScaling.kind={self.kind!r} is not supported; use one of {ROPE_KINDS}.",
        )
        _check(self.factor >= 1.0, f"RopeScaling.factor={self.factor} must be >= 1.0.")
        if self.kind == "llama3":
            _check(
                self.high_freq_factor > self.low_freq_factor > 0,
                "RopeScaling(kind='llama3') needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}.",
            )
            _check(
                self.original_max_positions > 0,
                "RopeScaling.original_max_positions must be positive.",
            )

    @classmethod
    def linear(cls, factor: float) -> RopeScaling:
        return cls(kind="none" if factor == 1.0 else "linear", factor=float(factor))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_positions: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_positions"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0,
                   f"ModelConfig.{name}={value!r} must be a positive integer.")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"ModelConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
            "(grouped-query attention shares each kv head among n_heads/n_kv_heads query heads).",
        )
        _check(self.head_dim % 2 == 0,
               f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.")
        _check(self.rms_eps > 0, f"ModelConfig.rms_eps={self.rms_eps} must be positive.")
        _check(self.rope_theta > 0, f"ModelConfig.rope_theta={self.rope_theta} must be positive.")
        _check(isinstance(self.rope_scaling, RopeScaling),
               "ModelConfig.rope_scaling must be a RopeScaling (use RopeScaling.linear(f)).")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES,
                   f"ModelConfig.{name}={getattr(self, name)!r} is not supported; use one of {DTYPES}.")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count of the dense model (no adapters), computed from shapes."""
        d = self.d_model
        attn = d * self.q_dim * 2 + d * self.kv_dim * 2
        mlp = 3 * d * self.ffn_dim
        block = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_context(self, seq_len: int) -> ModelConfig:
        """This config with linear RoPE scaling by ceil(seq_len / max_positions), LeMo's recipe."""
        factor = max(1, -(-seq_len // self.max_positions))
        if factor == 1:
            return self
        return self.replace(rope_scaling=RopeScaling.linear(factor),
                            max_positions=self.max_positions * factor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, f"Unknown ModelConfig keys {sorted(unknown)}.")
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters: W x + (alpha / rank) * B A x on the target projections."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        _check(isinstance(self.rank, int) and self.rank > 0,
               f"LoRAConfig.rank={self.rank!r} must be a positive integer.")
        _check(0.0 <= self.dropout < 1.0, f"LoRAConfig.dropout={self.dropout} must be in [0, 1).")
        _check(len(self.targets) > 0, "LoRAConfig.targets is empty; name at least one projection.")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not bad, f"LoRAConfig.targets has unknown projections {bad}; choose from {LORA_TARGETS}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


_PRESETS: dict[str, ModelConfig] = {
    # Test-sized: compiles in ~2 s, steps in milliseconds on CPU.
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_dim=128, max_positions=1024),
    # ~9.4M parameters with the default 8192-token BPE: CPU experiments.
    "small": ModelConfig(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
                         head_dim=32, ffn_dim=768, max_positions=2048),
    "llama2-7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=32, head_dim=128, ffn_dim=11008, rms_eps=1e-5,
                             rope_theta=10000.0, max_positions=4096),
    # SmolLM2-135M's shape (tokensparse.zoo.load("smollm2-135m") loads its weights).
    "smollm2-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, ffn_dim=1536, rms_eps=1e-5, rope_theta=100000.0,
                                max_positions=8192, tie_embeddings=True),
    "llama3-8b": ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, head_dim=128, ffn_dim=14336, rms_eps=1e-5,
                             rope_theta=500000.0, max_positions=8192),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named model shape, optionally with fields replaced (``preset("small", n_layers=4)``)."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available: {sorted(_PRESETS)}.")
    return _PRESETS[name].replace(**overrides) if overrides else _PRESETS[name]


def preset_names() -> list[str]:
    return sorted(_PRESETS)


MESH_AXES = ("data", "fsdp", "tensor", "seq")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh shape over the axes ``data``, ``fsdp``, ``tensor`` and ``seq``; -1 fills.

    ``data`` and ``fsdp`` split the batch (``fsdp`` also shards parameters and optimizer state),
    ``tensor`` splits heads and MLP channels, ``seq`` splits the sequence (token routing then selects
    per shard). At most one axis may be -1: it takes the devices the others leave; without one, the
    mesh uses the first ``data·fsdp·tensor·seq`` devices.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    seq: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        bad = [f"{n}={v}" for n, v in zip(MESH_AXES, sizes, strict=True) if v == 0 or v < -1]
        _check(not bad, f"MeshConfig {', '.join(bad)}: each axis size must be >= 1, or -1 to fill.")
        _check(sizes.count(-1) <= 1, f"MeshConfig has {sizes.count(-1)} axes set to -1; at most "
               "one axis can fill the remaining devices.")

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.tensor, self.seq)

    def shape(self, n_devices: int) -> tuple[int, int, int, int]:
        """The concrete axis sizes on ``n_devices`` devices."""
        sizes = list(self.sizes())
        fixed = 1
        for v in sizes:
            fixed *= max(v, 1)
        if -1 in sizes:
            _check(n_devices % fixed == 0, f"MeshConfig {self.sizes()}: the fixed axes use {fixed} "
                   f"devices, which does not divide the {n_devices} available.")
            sizes[sizes.index(-1)] = n_devices // fixed
        else:
            _check(fixed <= n_devices, f"MeshConfig {self.sizes()} needs {fixed} devices; only "
                   f"{n_devices} are available.")
        return tuple(sizes)

    def replace(self, **changes: Any) -> MeshConfig:
        return dataclasses.replace(self, **changes)


SCHEDULES = ("constant", "cosine")
SEQ_LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping for a training run (shared by pretraining and fine-tuning)."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "cosine"  # after warm-up: constant, or cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    remat: str = "none"  # none | full | dots | names (tokensparse.remat)
    remat_names: tuple[str, ...] = ("qkv", "attn_core")
    loss_segment: int = 0  # > 0: LM head + CE in checkpointed chunks of this many positions
    seq_layout: str = "contiguous"  # or "zigzag": balance causal attention over the mesh's seq axis
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0

    def __post_init__(self):
        from tokensparse.remat import REMAT_POLICIES

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                     "eval_batches"):
            _check(getattr(self, name) >= 1, f"TrainConfig.{name}={getattr(self, name)} must be >= 1.")
        _check(self.seq_len >= 2, f"TrainConfig.seq_len={self.seq_len} must be >= 2 (next-token "
               "prediction needs an input and a target).")
        _check(self.lr > 0, f"TrainConfig.lr={self.lr} must be positive.")
        _check(self.warmup_steps >= 0, f"TrainConfig.warmup_steps={self.warmup_steps} must be >= 0.")
        _check(self.schedule in SCHEDULES,
               f"TrainConfig.schedule={self.schedule!r} must be one of {SCHEDULES}.")
        _check(0 <= self.min_lr_ratio <= 1, "TrainConfig.min_lr_ratio must be in [0, 1].")
        _check(self.remat in REMAT_POLICIES,
               f"TrainConfig.remat={self.remat!r} must be one of {REMAT_POLICIES}.")
        _check(self.loss_segment >= 0, "TrainConfig.loss_segment must be >= 0 (0 disables).")
        _check(self.seq_layout in SEQ_LAYOUTS,
               f"TrainConfig.seq_layout={self.seq_layout!r} must be one of {SEQ_LAYOUTS}.")
        _check(self.eval_every >= 0, "TrainConfig.eval_every must be >= 0 (0: only at the end).")
        _check(self.grad_clip >= 0, "TrainConfig.grad_clip must be >= 0 (0 disables).")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


LEMO_SCHEDULES = ("half", "profile", "all", "algorithm1", "sensitivity")
LEMO_SELECTORS = ("oracle", "predictor")
LEMO_MLP_MODES = ("channel_sparse_bwd", "recompute", "dense")


@dataclasses.dataclass(frozen=True)
class LeMoConfig:
    """Contextual token elimination (LeMo spec §2): which layers are sparse and how much they keep.

    ``schedule="half"``: layers L/2-1 ... L-2 keep ``keep_ratio`` of their 64-token blocks, the rest
    are dense (the artifact's end-to-end setting). ``"all"``: every layer keeps ``keep_ratio``.
    ``"profile"``: ``profile[l]`` is layer l's keep ratio (1.0 = dense). ``"algorithm1"``: the
    profile is tuned on ``calibration_windows`` training windows before fine-tuning
    (:func:`tokensparse.lemo.threshold.tune_thresholds`, ``tune_rounds`` rounds).
    ``"sensitivity"``: the profile keeps ``keep_ratio`` in the layers where that costs the least
    calibration loss, cheapest first, within ``loss_budget`` nats, and is dense elsewhere
    (:func:`tokensparse.lemo.sensitivity.tune_profile`, a library choice).
    """

    block_size: int = 64
    keep_ratio: float = 0.4
    schedule: str = "half"
    profile: tuple[float, ...] | None = None
    selector: str = "oracle"
    mlp_mode: str = "channel_sparse_bwd"
    mlp_drop: float = 0.8  # fraction of MLP channels dropped in backward
    keep_first_block: bool = False
    route_shards: int = 0  # blocks are chosen per this many sequence pieces; 0: the mesh seq axis
    calibration_windows: int = 8  # schedules "algorithm1" and "sensitivity"
    tune_rounds: int = 5  # schedule="algorithm1" only
    loss_budget: float = 0.05  # schedule="sensitivity" only: nats of calibration loss to spend

    def __post_init__(self):
        _check(self.route_shards >= 0, f"LeMoConfig.route_shards={self.route_shards} must be >= 0 "
               "(0 follows the mesh's seq axis).")
        _check(self.block_size > 0, f"LeMoConfig.block_size={self.block_size} must be positive.")
        _check(0.0 < self.keep_ratio <= 1.0,
               f"LeMoConfig.keep_ratio={self.keep_ratio} must be in (0, 1].")
        _check(self.schedule in LEMO_SCHEDULES,
               f"LeMoConfig.schedule={self.schedule!r} must be one of {LEMO_SCHEDULES}.")
        _check((self.schedule == "profile") == (self.profile is not None),
               "LeMoConfig.profile must be given exactly when schedule='profile'.")
        if self.profile is not None:
            bad = [r for r in self.profile if not 0.0 < r <= 1.0]
            _check(not bad, f"LeMoConfig.profile has keep ratios outside (0, 1]: {bad}.")
        _check(self.selector in LEMO_SELECTORS,
               f"LeMoConfig.selector={self.selector!r} must be one of {LEMO_SELECTORS}.")
        _check(self.mlp_mode in LEMO_MLP_MODES,
               f"LeMoConfig.mlp_mode={self.mlp_mode!r} must be one of {LEMO_MLP_MODES}.")
        _check(0.0 <= self.mlp_drop < 1.0, f"LeMoConfig.mlp_drop={self.mlp_drop} must be in [0, 1).")
        _check(self.calibration_windows >= 1 and self.tune_rounds >= 0,
               "LeMoConfig.calibration_windows must be >= 1 and tune_rounds >= 0.")
        _check(self.loss_budget >= 0.0, f"LeMoConfig.loss_budget={self.loss_budget} must be >= 0 "
               "(nats of calibration loss).")

    def keep_ratios(self, n_layers: int) -> tuple[float, ...]:
        """Per-layer keep ratio (1.0 = dense layer) for a model with ``n_layers`` layers."""
        if self.schedule == "profile":
            _check(len(self.profile) == n_layers,
                   f"LeMoConfig.profile has {len(self.profile)} entries; the model has {n_layers} "
                   "layers.")
            return tuple(float(r) for r in self.profile)
        if self.schedule == "all":
            return (self.keep_ratio,) * n_layers
        _check(self.schedule != "algorithm1", "LeMoConfig.schedule='algorithm1' has no keep ratios "
               "until tuned: run tokensparse.lemo.threshold.tune_thresholds and train with "
               "schedule='profile' (runs.finetune does this for you).")
        _check(self.schedule != "sensitivity", "LeMoConfig.schedule='sensitivity' has no keep "
               "ratios until measured: run tokensparse.lemo.sensitivity.tune_profile and train with "
               "schedule='profile' (runs.finetune does this for you).")
        first, last = n_layers // 2 - 1, n_layers - 2
        return tuple(self.keep_ratio if first <= i <= last else 1.0 for i in range(n_layers))

    def replace(self, **changes: Any) -> LeMoConfig:
        return dataclasses.replace(self, **changes)
