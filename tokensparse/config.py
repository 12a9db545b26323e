"""Frozen, validated configuration dataclasses and named presets.

Configs are plain data: hashable (usable as static jit arguments), comparable, and round-trip through
``to_dict`` / ``from_dict`` so experiments can write them next to checkpoints. Validation happens in
``__post_init__`` and every message says which field to change.

Each field is documented by the string literal under it (an attribute docstring): what it is and
what it does. The experiment scripts build their command-line configs from these dataclasses and
show those docstrings as the fields' help (``experiments/config_dicts.py``, ``--config_help``), so
adding an option is one field, its validation in ``__post_init__`` and its docstring.
"""

from __future__ import annotations

import dataclasses
import math
import sys
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
    """none | linear | llama3."""
    factor: float = 1.0
    """How many times longer the context is than the one the frequencies were trained for (>= 1)."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above original_max_positions / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below original_max_positions / high_freq_factor are not scaled."""
    original_max_positions: int = 8192
    """llama3 only: the context the base frequencies were trained at."""

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
    """Token ids the embedding and the LM head cover."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Decoder blocks."""
    n_heads: int
    """Query heads per attention layer."""
    n_kv_heads: int
    """Key/value heads; each is shared by n_heads / n_kv_heads query heads (grouped-query attention)."""
    head_dim: int
    """Width of one attention head (even: RoPE rotates pairs of channels)."""
    ffn_dim: int
    """Hidden width of the SwiGLU MLP."""
    rms_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling = RopeScaling()
    """How RoPE frequencies are adapted to a longer context than they were trained for."""
    max_positions: int = 4096
    """The context length the model is built for."""
    tie_embeddings: bool = False
    """The LM head reuses the embedding matrix."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16 or float16."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters: float32, bfloat16 or float16."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of fresh weights."""

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
    """Rank r of every adapter."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training, in [0, 1)."""
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    """Projections that get adapters: any of q, k, v, o, gate, up, down."""

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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus a run trains and evaluates on, and the tokenizer trained for it."""

    source: str = "shakespeare"
    """A tokensparse.data corpus name, or a directory of .txt files (one document each)."""
    vocab_size: int = 8192
    """Size of the BPE tokenizer trained on the corpus (a base with its own tokenizer ignores it)."""
    tokenizer: str = ""
    """A tokenizer.json (or a directory holding one) to use instead of training a BPE: needed to
    fine-tune a base that ships none; for a base with its own it must have the same vocabulary."""

    def __post_init__(self):
        _check(isinstance(self.source, str) and bool(self.source),
               f"DataConfig.source={self.source!r} must name a corpus or a directory.")
        _check(isinstance(self.tokenizer, str),
               f"DataConfig.tokenizer={self.tokenizer!r} must be a path (or empty).")
        _check(isinstance(self.vocab_size, int) and self.vocab_size >= 2,
               f"DataConfig.vocab_size={self.vocab_size!r} must be an integer >= 2.")


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
    """Data-parallel axis: splits the batch (-1: the devices the other axes leave)."""
    fsdp: int = 1
    """Fully sharded data-parallel axis: splits the batch, parameters and optimizer state."""
    tensor: int = 1
    """Tensor-parallel axis: splits attention heads and MLP channels."""
    seq: int = 1
    """Sequence-parallel axis: splits the sequence; token routing then selects per shard."""

    def __post_init__(self):
        for name, v in zip(MESH_AXES, self.sizes(), strict=True):
            _check(isinstance(v, int) and (v >= 1 or v == -1),
                   f"MeshConfig.{name}={v!r} must be >= 1, or -1 to fill the remaining devices.")
        sizes = self.sizes()
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
    """Optimizer steps of the run (a resumed run continues to this many)."""
    batch_size: int = 8
    """Rows per optimizer step (the global batch); with grad_accum_steps > 1 it is split into that
    many micro-batches of batch_size / grad_accum_steps rows."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: their gradients are summed (weighted by target tokens) under
    one compiled step, then one update is applied; must divide batch_size. Same update as one batch of
    batch_size rows, with a micro-batch's activation memory."""
    seq_len: int = 256
    """Tokens per row: the training context."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to lr."""
    schedule: str = "cosine"
    """After warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of lr, in [0, 1]."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay."""
    b1: float = 0.9
    """AdamW's first-moment decay."""
    b2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this; 0 disables clipping."""
    remat: str = "none"
    """Activation checkpointing per decoder block: none | full | dots | names | offload
    (tokensparse.remat)."""
    remat_names: tuple[str, ...] = ("qkv", "attn_core")
    """With remat=names or offload: the tagged tensors that are saved (block_in, qkv, attn_core,
    attn_out, mlp_out); the rest is recomputed."""
    loss_segment: int = 0
    """> 0: compute the LM head and cross-entropy in checkpointed chunks of this many positions (no
    full [T, vocab] logits); 0: all at once."""
    seq_layout: str = "contiguous"
    """contiguous, or zigzag: reorder each row so causal attention is balanced over the mesh's seq
    axis."""
    log_every: int = 10
    """Log (metrics.jsonl, TensorBoard, progress) every this many steps; the losses stay on the
    device in between (no per-step host sync)."""
    eval_every: int = 100
    """Evaluate (val_loss in metrics.jsonl) every this many steps and at the end; 0: only at the
    end."""
    tensorboard: bool = True
    """Also write TensorBoard event files to workdir/tensorboard (needs tensorboardX)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs wandb installed); empty: off."""
    eval_batches: int = 8
    """Validation batches (or windows) each evaluation scores."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk, newest first."""
    seed: int = 0
    """Seed of the initialisation, the data order and every random draw of training."""
    allow_changed_resume: bool = False
    """Resume a workdir even though settings that change the training trajectory (lr, schedule,
    batch size, seq_len, seed, optimizer, LoRA / LeMo / SUBLLM options, data, tokenizer, model)
    differ from the ones it was started with; without it such a resume is refused with the changed
    fields."""

    def __post_init__(self):
        from tokensparse.remat import REMAT_POLICIES

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                     "eval_batches"):
            _check(getattr(self, name) >= 1, f"TrainConfig.{name}={getattr(self, name)} must be >= 1.")
        _check(self.seq_len >= 2, f"TrainConfig.seq_len={self.seq_len} must be >= 2 (next-token "
               "prediction needs an input and a target).")
        _check(math.isfinite(self.lr) and self.lr > 0,
               f"TrainConfig.lr={self.lr} must be finite and positive.")
        for name in ("b1", "b2"):
            _check(0 <= getattr(self, name) < 1,
                   f"TrainConfig.{name}={getattr(self, name)} must be in [0, 1) (AdamW's moment decay).")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               f"TrainConfig.weight_decay={self.weight_decay} must be finite and >= 0.")
        _check(isinstance(self.seed, int) and self.seed >= 0,
               f"TrainConfig.seed={self.seed!r} must be an integer >= 0.")
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
        _check(isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1,
               f"TrainConfig.grad_accum_steps={self.grad_accum_steps!r} must be an integer >= 1.")
        _check(self.batch_size % self.grad_accum_steps == 0,
               f"TrainConfig.grad_accum_steps={self.grad_accum_steps} must divide "
               f"batch_size={self.batch_size} (batch_size is the batch of one optimizer step).")
        _check(math.isfinite(self.grad_clip) and self.grad_clip >= 0,
               f"TrainConfig.grad_clip={self.grad_clip} must be finite and >= 0 (0 disables).")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


LEMO_SCHEDULES = ("half", "profile", "all", "algorithm1", "sensitivity")
# The built-in selection rules (tokensparse.lemo.rules); a rule registered there at run time with
# tokensparse.lemo.rules.register is accepted too.
LEMO_SELECTORS = ("oracle", "predictor", "random", "attention_ratio", "attention_mass", "recent",
                  "ratio_mass", "learned")
LEMO_MLP_MODES = ("channel_sparse_bwd", "recompute", "dense")
LEMO_OFFLOAD_MODES = ("none", "uniform", "sparsity")
LEMO_ELIMINATED_MODES = ("pass", "sink_local")  # tokensparse.lemo.fill


def lemo_selectors() -> tuple[str, ...]:
    """The selection rules LeMoConfig.selector accepts: the built-in ones and any registered with
    ``tokensparse.lemo.rules.register`` (read from the registry only once it has been imported, so
    that this module imports nothing of the model)."""
    rules = sys.modules.get("tokensparse.lemo.rules")
    extra = () if rules is None else tuple(n for n in rules.names() if n not in LEMO_SELECTORS)
    return LEMO_SELECTORS + extra


@dataclasses.dataclass(frozen=True)
class LeMoConfig:
    """Contextual token elimination (LeMo's algorithm): which layers are sparse and how much they keep."""

    block_size: int = 64
    """Tokens per block: attention keeps or drops whole blocks of keys and queries."""
    keep_ratio: float = 0.4
    """Fraction of blocks a sparse layer keeps, in (0, 1] (schedules half, all and sensitivity)."""
    schedule: str = "half"
    """Which layers are sparse. half: layers L/2-1 ... L-2 keep keep_ratio, the rest are dense (the
    artifact's end-to-end setting); all: every layer keeps keep_ratio; profile: layer l keeps
    profile[l]; algorithm1: a profile tuned on calibration_windows training windows before
    fine-tuning (tokensparse.lemo.profiles.algorithm1.tune_thresholds, tune_rounds rounds); sensitivity:
    keep_ratio in the layers where it costs the least calibration loss, cheapest first, within
    loss_budget nats, dense elsewhere (tokensparse.lemo.profiles.sensitivity.tune_profile)."""
    profile: tuple[float, ...] | None = None
    """Per-layer keep ratios in (0, 1] (1.0: dense), given exactly when schedule=profile."""
    selector: str = "learned"
    """How a sparse layer scores its blocks (tokensparse.lemo.rules; higher is kept). The default,
    learned, is a trained per-token MLP on the layer's input (tokensparse.lemo.learned_selector;
    about 0.03% of a 7B step's FLOPs): tokensparse.zoo.load attaches SmolLM2's shipped weights; for
    another model train them with `python -m experiments.train_selector` (without them LeMo stops
    with an error naming that command). The others: oracle (the spec's key-side score: sum over
    heads of ReLU(q.k), tile max, column sums; measured worse than random blocks on SmolLM2),
    predictor (trained pattern predictors of the oracle, attached to the model), random (seeded by
    the layer and the positions), attention_ratio (per token |attention output| / |residual input|
    from a dense attention pass, block mean), attention_mass (causal softmax attention received, H2O-style),
    recent (the latest blocks), ratio_mass (attention_ratio plus the attention mass received from
    queries weighted by their ratio)."""
    score_causal: bool = False
    """Oracle scores and predictor targets: only query blocks at or after a key block count (the
    spec's default ranks the whole sequence, future queries included)."""
    score_scale_by_sqrt_d: bool = False
    """Oracle scores and predictor targets: multiply q.k by 1/sqrt(head_dim)."""
    score_divide_by_heads: bool = False
    """Oracle scores and predictor targets: average over heads instead of summing."""
    score_exclude_diagonal: bool = False
    """Oracle scores and predictor targets: leave out each token's score of itself (i == j)."""
    score_post_rope: bool = False
    """Oracle scores and predictor targets: score q, k after RoPE (the artifact scores them before)."""
    mlp_mode: str = "channel_sparse_bwd"
    """The MLP backward of sparse layers: channel_sparse_bwd (only the strongest channels), recompute
    (exact, recomputed from the MLP's input) or dense."""
    mlp_drop: float = 0.8
    """With mlp_mode=channel_sparse_bwd: the fraction of MLP channels dropped in the backward, in
    [0, 1)."""
    mlp_drop_profile: tuple[float, ...] | None = None
    """With mlp_mode=channel_sparse_bwd: per-layer fractions of MLP channels dropped in the backward
    of the sparse layers (one per layer, each in [0, 1); spec 2.6's ablation), instead of mlp_drop."""
    keep_first_block: bool = True
    """Always keep each sequence's first block (the attention sink). On by default: on SmolLM2 it
    lowers the zero-step loss of every query-side rule (attention_ratio at keep 0.7: +0.50 nats over
    dense with it, +1.23 without); the spec's setting is False."""
    eliminated: str = "sink_local"
    """What an eliminated block's tokens get from attention: sink_local (the default): each
    eliminated block attends, causally, to the row's first block and to itself (2 x block_size keys
    per query; its own keys are seen by nothing else), recomputed in the backward
    (tokensparse.lemo.fill); pass: nothing, h = x (the spec). On SmolLM2 (1K held-out English, half
    schedule, no training) sink_local cuts the attention_ratio rule's loss above dense at keep 0.7
    from +0.74 to +0.19 nats. Costs the eliminated rows' q/k/v/o projections (forward, recomputation
    and backward) and keeps their input for the backward: at 8K on llama2-7b the LoRA / LeMo
    activation ratio falls from 2.07x to 1.84x and the FLOPs ratio from 1.60x to 1.40x."""
    route_shards: int = 0
    """Blocks are chosen per this many contiguous pieces of the sequence; 0: the mesh's seq axis
    (one piece on one device)."""
    calibration_windows: int = 8
    """Training windows the algorithm1 and sensitivity schedules calibrate on."""
    tune_rounds: int = 5
    """Rounds of Algorithm 1 (schedule=algorithm1)."""
    loss_budget: float = 0.05
    """schedule=sensitivity: nats of calibration loss the sparse layers may cost together."""
    two_d: bool = False
    """Jenga's two-dimensional sparsity: sparse layers run shifted sparse attention (LongLoRA's
    S2-Attn: 8 groups of the kept tokens, half the heads shifted by half a group) over their kept
    tokens (tokensparse.lemo.two_d). Training only; evaluation stays dense."""
    offload: str = "none"
    """Jenga's activation offload to host memory, per layer (needs TrainConfig.remat=names or
    offload; its remat_names are what may move): none; uniform: each layer moves up to
    offload_budget_mib of them; sparsity: the same total, split in proportion to each layer's
    candidate bytes, which follow its keep ratio (tokensparse.lemo.offload). Saves no FLOPs; the
    memory effect shows only on a GPU or TPU."""
    offload_budget_mib: float = 0.0
    """With offload=uniform or sparsity: MiB (whole batch) of remat_names moved to host per layer,
    on average over the layers; the rest stays on device."""

    def __post_init__(self):
        _check(self.route_shards >= 0, f"LeMoConfig.route_shards={self.route_shards} must be >= 0 "
               "(0 follows the mesh's seq axis).")
        _check(self.block_size > 0, f"LeMoConfig.block_size={self.block_size} must be positive.")
        _check(0.0 < self.keep_ratio <= 1.0,
               f"LeMoConfig.keep_ratio={self.keep_ratio} must be in (0, 1].")
        _check(self.schedule in LEMO_SCHEDULES,
               f"LeMoConfig.schedule={self.schedule!r} must be one of {LEMO_SCHEDULES}.")
        _check((self.schedule == "profile") == (self.profile is not None),
               f"LeMoConfig.profile={self.profile!r} must be given exactly when "
               f"LeMoConfig.schedule='profile' (it is {self.schedule!r}).")
        if self.profile is not None:
            bad = [r for r in self.profile if not 0.0 < r <= 1.0]
            _check(not bad, f"LeMoConfig.profile has keep ratios outside (0, 1]: {bad}.")
        _check(self.selector in lemo_selectors(),
               f"LeMoConfig.selector={self.selector!r} must be one of {lemo_selectors()}.")
        _check(self.mlp_mode in LEMO_MLP_MODES,
               f"LeMoConfig.mlp_mode={self.mlp_mode!r} must be one of {LEMO_MLP_MODES}.")
        _check(0.0 <= self.mlp_drop < 1.0, f"LeMoConfig.mlp_drop={self.mlp_drop} must be in [0, 1).")
        if self.mlp_drop_profile is not None:
            bad = [p for p in self.mlp_drop_profile if not 0.0 <= p < 1.0]
            _check(not bad, f"LeMoConfig.mlp_drop_profile has fractions outside [0, 1): {bad}.")
        _check(self.calibration_windows >= 1 and self.tune_rounds >= 0,
               "LeMoConfig.calibration_windows must be >= 1 and tune_rounds >= 0.")
        _check(self.eliminated in LEMO_ELIMINATED_MODES,
               f"LeMoConfig.eliminated={self.eliminated!r} must be one of {LEMO_ELIMINATED_MODES}.")
        _check(self.offload in LEMO_OFFLOAD_MODES,
               f"LeMoConfig.offload={self.offload!r} must be one of {LEMO_OFFLOAD_MODES}.")
        _check(self.offload == "none" or self.offload_budget_mib > 0,
               f"LeMoConfig.offload={self.offload!r} needs offload_budget_mib > 0 (it is "
               f"{self.offload_budget_mib}).")
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
               "until tuned: run tokensparse.lemo.profiles.algorithm1.tune_thresholds and train with "
               "schedule='profile' (tokensparse.pipelines.finetune does this for you).")
        _check(self.schedule != "sensitivity", "LeMoConfig.schedule='sensitivity' has no keep "
               "ratios until measured: run tokensparse.lemo.profiles.sensitivity.tune_profile and train with "
               "schedule='profile' (tokensparse.pipelines.finetune does this for you).")
        first, last = n_layers // 2 - 1, n_layers - 2
        return tuple(self.keep_ratio if first <= i <= last else 1.0 for i in range(n_layers))

    def replace(self, **changes: Any) -> LeMoConfig:
        return dataclasses.replace(self, **changes)
