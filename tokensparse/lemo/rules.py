"""LeMo's selection rules: how a sparse layer scores its blocks (``LeMoConfig.selector``).

A rule is a function ``score(block, h, layer, lemo) -> Float[B, n_b]`` (higher = keep): ``block``
the layer's :class:`~tokensparse.llama.DecoderBlock`, ``h`` its residual input [B, T, D] (under
``stop_gradient``), ``layer`` the :class:`~tokensparse.layer_loop.Layer` (positions, segment ids and
an index that is traced under a scan), ``lemo`` the config. The router
(:func:`tokensparse.lemo.selection.lemo_router`) calls it inside the LeMo forward, outside any remat
region, and then keeps the top ``floor(ρ_l · n_b)`` blocks (:func:`tokensparse.lemo.scoring.
select_blocks`). :func:`layer_scores` wraps every rule the same way: the computation runs under
``jax.named_scope("lemo_selection")`` (so compiled-FLOPs accounting can attribute it), without
gradient, and blocks without a valid token (segment id < 0, a padded tail) score −inf.

Built-in rules:

- ``oracle``: the spec's key-side score (Σ_h ReLU(q·kᵀ), tile max, column sums;
  :mod:`tokensparse.lemo.scoring`), with the ``score_*`` flags of the config (``post_rope`` included).
- ``predictor``: the spec's trained predictors of the oracle, attached to the model (one module per
  layer, so ``per_layer``).
- ``random``: uniform scores seeded by the layer index and a fold of the positions: a recomputation
  (or another call on the same inputs) selects the same blocks.
- ``attention_ratio``: the exact query-side rule. Per token ‖a_t‖ / ‖h_t‖, ``a`` the layer's attention
  output after ``o_proj`` from a dense attention pass, averaged over the block's valid tokens. An
  eliminated token loses its own attention update, so keep the tokens whose update changes their
  residual the most. (On whole blocks the block sum ranks the same as the mean.)
- ``attention_mass``: H2O-style: the causal softmax attention probability a token receives, summed
  over queries and averaged over heads, summed over the block's tokens (column sums).
- ``recent``: the latest blocks.
- ``ratio_mass``: query- and key-side evidence together: the block's ``attention_ratio`` plus the
  attention mass it receives from queries weighted by their own ratio (queries likely to be kept),
  each divided by its mean over the row's valid blocks.
- ``learned``: a trained per-token MLP on the layer's input predicting ``attention_ratio`` at ≈ 0.03%
  of a 7B step (:mod:`tokensparse.lemo.learned_selector`; weights on ``model.lemo_selector``).

Extending: ``register("name", fn)`` adds a rule (``LeMoConfig.selector="name"`` then validates, see
:func:`tokensparse.config.lemo_selectors`). ``bind=`` gives a factory ``bind(model, lemo) -> fn``
for rules that need the model (e.g. attached weights); ``per_layer=True`` runs every sparse layer as
its own loop step, with its static index in ``layer.kind.layer``; ``check(model, lemo, ratios)``
raises ``ValueError`` before compiling when the rule cannot run (missing weights: name the command
that makes them). A rule living in its own module (``learned``:
:mod:`tokensparse.lemo.learned_selector`, which imports nothing of this one) is registered at the
end of this module from its ``bind`` and ``check``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from tokensparse.config import LeMoConfig
from tokensparse.layer_loop import Layer
from tokensparse.lemo import learned_selector, scoring
from tokensparse.llama import DecoderBlock, Llama

SCOPE = "lemo_selection"

ScoreFn = Callable[[DecoderBlock, Array, Layer, LeMoConfig], Float[Array, "b nb"]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered selection rule (see the module docstring)."""

    name: str
    score: ScoreFn | None = None
    bind: Callable[[Llama, LeMoConfig], ScoreFn] | None = None
    per_layer: bool = False
    check: Callable[[Llama, LeMoConfig, tuple[float, ...]], None] | None = None
    description: str = ""

    def scorer(self, model: Llama | None, lemo: LeMoConfig) -> ScoreFn:
        """The score function for ``model`` (rules with ``bind`` need the model)."""
        if self.bind is None:
            return self.score
        if model is None:
            raise ValueError(f"selection rule {self.name!r} needs the model to bind to.")
        return self.bind(model, lemo)


_RULES: dict[str, Rule] = {}


def register(name: str, score: ScoreFn | None = None, *, bind=None, per_layer: bool = False,
             check=None, description: str = "", replace: bool = False) -> Rule:
    """Add a rule under ``name`` (exactly one of ``score`` or ``bind``); returns it."""
    if (score is None) == (bind is None):
        raise ValueError(f"rule {name!r}: give exactly one of score or bind.")
    if name in _RULES and not replace:
        raise ValueError(f"a selection rule named {name!r} is already registered (replace=True).")
    rule = Rule(name, score, bind, per_layer, check, description)
    _RULES[name] = rule
    return rule


def get(name: str) -> Rule:
    if name not in _RULES:
        raise ValueError(f"unknown selection rule {name!r}; registered: {names()}.")
    return _RULES[name]


def names() -> tuple[str, ...]:
    return tuple(_RULES)


# ----------------------------------------------------------------------------- shared pieces


def token_valid(layer: Layer, shape) -> Bool[Array, "b t"]:
    """Tokens that count: segment id ≥ 0 (all of them without segment ids)."""
    if layer.segment_ids is None:
        return jnp.ones(shape, bool)
    return layer.segment_ids >= 0


def block_reduce(x: Float[Array, "b t"], valid: Bool[Array, "b t"], block_size: int, *,
                 mean: bool) -> Float[Array, "b nb"]:
    """Per block, the sum (or the mean) of ``x`` over its valid tokens; −inf without any."""
    b, t = x.shape
    nb = -(-t // block_size)
    pad = nb * block_size - t
    x = jnp.pad(jnp.where(valid, x, 0.0), ((0, 0), (0, pad))).reshape(b, nb, block_size)
    count = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, nb, block_size).sum(-1)
    total = x.sum(-1)
    out = total / jnp.maximum(count, 1) if mean else total
    return jnp.where(count > 0, out, -jnp.inf)


def normalised(scores: Float[Array, "b nb"]) -> Float[Array, "b nb"]:
    """Scores divided by their mean over the row's finite (valid) blocks."""
    finite = jnp.isfinite(scores)
    mean = jnp.sum(jnp.where(finite, scores, 0.0), -1, keepdims=True) / jnp.maximum(
        finite.sum(-1, keepdims=True), 1)
    return scores / jnp.where(mean > 0, mean, 1.0)


def layer_scores(score: ScoreFn, block: DecoderBlock, h: Float[Array, "b t d"], layer: Layer,
                 lemo: LeMoConfig) -> Float[Array, "b nb"]:
    """``score``'s block scores of this layer, as the router uses them: no gradient, counted under
    ``jax.named_scope("lemo_selection")``, −inf for blocks without a valid token."""
    with jax.named_scope(SCOPE):
        h = jax.lax.stop_gradient(h)
        scores = jax.lax.stop_gradient(score(block, h, layer, lemo)).astype(jnp.float32)
        valid = token_valid(layer, h.shape[:2])
        has_token = block_reduce(valid.astype(jnp.float32), valid, lemo.block_size, mean=False)
        return jnp.where(jnp.isfinite(has_token), scores, -jnp.inf)


def attention_output(block: DecoderBlock, h: Float[Array, "b t d"], layer: Layer
                     ) -> Float[Array, "b t d"]:
    """The layer's dense attention output after ``o_proj`` (what a kept token adds to its residual)."""
    return block.attn(block.input_norm(h), layer.positions, layer.segment_ids)


def token_ratio(block: DecoderBlock, h: Float[Array, "b t d"], layer: Layer
                ) -> Float[Array, "b t"]:
    """‖a_t‖ / ‖h_t‖ per token: how much the layer's attention changes each token's residual."""
    a = attention_output(block, h, layer).astype(jnp.float32)
    hf = h.astype(jnp.float32)
    return jnp.linalg.norm(a, axis=-1) / jnp.maximum(jnp.linalg.norm(hf, axis=-1), 1e-6)


def attention_mass(q: Float[Array, "b t h d"], k: Float[Array, "b t hkv d"], positions,
                   segment_ids, block_size: int, query_weights: Float[Array, "b t"] | None = None
                   ) -> Float[Array, "b t"]:
    """Causal softmax attention each key token receives: Σ_i w_i · mean_h P_h(i, j) (w = 1 without
    ``query_weights``), with the model's mask (positions, segment ids; padding sees nothing). A scan
    over query blocks: memory O(H · block · T), never [T, T]. ``q``, ``k`` rotated (T a multiple of
    ``block_size``)."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    nb = t // block_size
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    w = jnp.ones((b, t), jnp.float32) if query_weights is None else query_weights
    w = jnp.where(seg >= 0, w, 0.0)
    qb = q.astype(jnp.float32).reshape(b, nb, block_size, hkv, h // hkv, d).transpose(
        1, 0, 2, 3, 4, 5)
    kf = k.astype(jnp.float32)

    def chunk(x):
        return x.reshape(b, nb, block_size).transpose(1, 0, 2)

    def step(acc, xs):
        qm, pm, sm, wm = xs
        logits = jnp.einsum("bikgd,bjkd->bkgij", qm, kf) / math.sqrt(d)
        mask = ((positions[:, None, :] <= pm[:, :, None]) & (seg[:, None, :] == sm[:, :, None])
                & (sm[:, :, None] >= 0))[:, None, None]
        logits = jnp.where(mask, logits, -jnp.inf)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
        p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
        return acc + jnp.einsum("bkgij,bi->bj", p, wm) / h, None

    acc, _ = jax.lax.scan(step, jnp.zeros((b, t), jnp.float32),
                          (qb, chunk(positions), chunk(seg), chunk(w)))
    return acc


# ----------------------------------------------------------------------------- the rules


def pre_rope_qk(block: DecoderBlock, u: Float[Array, "b t d"]) -> tuple[Array, Array]:
    """The layer's per-head q [B, T, H, D] and k [B, T, Hkv, D] before RoPE (with its current LoRA),
    from ``stop_gradient(u)``: what the oracle scores and the predictor targets are made of."""
    u = jax.lax.stop_gradient(u)
    b, t, _ = u.shape
    attn = block.attn
    q = attn.q_proj(u).reshape(b, t, attn.n_heads, attn.head_dim)
    k = attn.k_proj(u).reshape(b, t, attn.n_kv_heads, attn.head_dim)
    return q, k


def scoring_qk(block: DecoderBlock, u: Float[Array, "b t d"], positions,
               opts: scoring.ScoreOptions) -> tuple[Array, Array]:
    """The q, k the oracle scores: :func:`pre_rope_qk`, or rotated at ``positions`` when
    ``opts.post_rope`` (no gradient either way)."""
    if not opts.post_rope:
        return pre_rope_qk(block, u)
    q, k, _ = block.attn.project_qkv(jax.lax.stop_gradient(u), positions)
    return q, k


def oracle(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig):
    """The spec's oracle under the config's ``score_*`` flags."""
    opts = scoring.ScoreOptions.from_lemo(lemo)
    valid = None if layer.segment_ids is None else layer.segment_ids >= 0
    q, k = scoring_qk(block, block.input_norm(h), layer.positions, opts)
    return scoring.block_scores(q, k, opts, valid=valid)


def random_scores(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig):
    """Uniform scores from a key folded from the layer index and the positions."""
    del block
    b, t = h.shape[:2]
    pos = layer.positions.astype(jnp.uint32)
    weights = (2 * jnp.arange(t, dtype=jnp.uint32) + 1)[None, :]
    fold = jnp.sum(pos * weights, dtype=jnp.uint32)  # wraps mod 2^32: only a seed
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), layer.index), fold)
    return jax.random.uniform(key, (b, -(-t // lemo.block_size)))


def attention_ratio(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig):
    """Block mean of ‖attention output‖ / ‖residual input‖ (exact: a dense attention pass)."""
    valid = token_valid(layer, h.shape[:2])
    return block_reduce(token_ratio(block, h, layer), valid, lemo.block_size, mean=True)


def _rotated_qk(block: DecoderBlock, h, layer: Layer):
    q, k, _ = block.attn.project_qkv(block.input_norm(h), layer.positions)
    return q, k


def attention_mass_scores(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig):
    """Block sums of the causal softmax attention each token receives (H2O)."""
    q, k = _rotated_qk(block, h, layer)
    mass = attention_mass(q, k, layer.positions, layer.segment_ids, lemo.block_size)
    return block_reduce(mass, token_valid(layer, h.shape[:2]), lemo.block_size, mean=False)


def recent(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig):
    """The block index: later blocks first."""
    del block, layer
    nb = -(-h.shape[1] // lemo.block_size)
    return jnp.broadcast_to(jnp.arange(nb, dtype=jnp.float32), (h.shape[0], nb))


RATIO_MASS_WEIGHT = 1.0  # λ of ratio_mass: ratio + λ · ratio-weighted mass, both mean-normalised


def ratio_mass(block: DecoderBlock, h, layer: Layer, lemo: LeMoConfig,
               weight: float = RATIO_MASS_WEIGHT):
    """Query side (the block's ratio) plus key side (mass received from ratio-weighted queries)."""
    valid = token_valid(layer, h.shape[:2])
    ratio = token_ratio(block, h, layer)
    q, k = _rotated_qk(block, h, layer)
    mass = attention_mass(q, k, layer.positions, layer.segment_ids, lemo.block_size,
                          query_weights=ratio)
    r = normalised(block_reduce(ratio, valid, lemo.block_size, mean=True))
    m = normalised(block_reduce(mass, valid, lemo.block_size, mean=False))
    return r + weight * m


def _bind_predictor(model: Llama, lemo: LeMoConfig) -> ScoreFn:
    from tokensparse.lemo import predictor

    predictors = predictor.attached(model)

    def score(block, h, layer, lemo):
        return predictors.for_layer(layer.kind.layer).column_scores(block.input_norm(h))
    return score


register("oracle", oracle, description="the spec's key-side oracle (q·kᵀ tile max, column sums)")
register("predictor", bind=_bind_predictor, per_layer=True,
         description="the spec's trained predictors of the oracle")
register("random", random_scores, description="uniform, seeded by the layer and positions")
register("attention_ratio", attention_ratio,
         description="block mean of |attention output| / |residual| (dense attention pass)")
register("attention_mass", attention_mass_scores,
         description="causal softmax attention received, column sums (H2O)")
register("recent", recent, description="the most recent blocks")
register("ratio_mass", ratio_mass,
         description="attention_ratio + mass received from ratio-weighted queries")

register("learned", bind=learned_selector.bind, check=learned_selector.check,
         description="trained per-token MLP on the layer input predicting attention_ratio")
