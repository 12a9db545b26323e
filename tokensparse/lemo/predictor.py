"""LeMo's learned pattern predictors: each layer's informative blocks, predicted from its input.

The oracle (:mod:`tokensparse.lemo.scoring`) costs a q·kᵀ pass per sparse layer, as much as attention
itself. A predictor replaces it with two small MLPs over *blocks* of the layer's normed input X
(the tensor fed to q/k/v_proj), one per side::

    rows  = X [B, T, D] → [B, T, H, D/H] → [B, H, n_b, block·D/H]   (a reshape, not a projection)
    q̂ = W3ᵠ ReLU(W2ᵠ ReLU(W1ᵠ rows))        k̂ likewise             each [B, H, n_b, head_dim]
    P[m, n] = Σ_h q̂_hm · k̂_hn                                         (predicted tile matrix)
    ĉ_n    = Σ_m P[m, n] = Σ_h k̂_hn · (Σ_m q̂_hm)                      (predicted column score)

No biases; widths h1 = 128 and h2 = block·D/H by default. Training fits P to the oracle's tile matrix
(:mod:`tokensparse.lemo.predictor_training`); fine-tuning only needs ĉ, and the second form of it
never builds P, so the predictor path is linear in T. Predictors run on ``stop_gradient(X)`` and are
frozen: their weights are :class:`PredictorParam`, not ``nnx.Param``, so no optimizer over model or
LoRA parameters touches them. Elastic pruning shrinks h1 and h2 per path; the widths are read from
the weight shapes and stored with them (:func:`save_predictors`).

A model carries its predictors as ``model.lemo_predictors`` (:func:`attach`); the LeMo forward uses
them with ``LeMoConfig.selector="predictor"``. Dense evaluation never calls them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from tokensparse.checkpoint import Checkpointer, CheckpointError
from tokensparse.config import ModelConfig

WEIGHTS = ("w1", "w2", "w3")
PATHS = ("q", "k")
FORMAT = "tokensparse.lemo.predictors/1"


class PredictorParam(nnx.Variable):
    """A LeMo predictor weight: frozen during fine-tuning, trained only by ``train_predictors``."""


def block_rows(x: Float[Array, "b t d"], n_heads: int, block_size: int
               ) -> Float[Array, "b h nb r"]:
    """(head slice, block) rows of X: [B, T, D] → [B, H, n_b, block · D/H]."""
    b, t, d = x.shape
    if t % block_size:
        raise ValueError(f"predictor input length {t} is not a multiple of the block size "
                         f"{block_size}.")
    if d % n_heads:
        raise ValueError(f"d_model={d} is not divisible by n_heads={n_heads}.")
    nb, width = t // block_size, d // n_heads
    rows = x.reshape(b, nb, block_size, n_heads, width).transpose(0, 3, 1, 2, 4)
    return rows.reshape(b, n_heads, nb, block_size * width)


def path_forward(weights: Mapping[str, Array], rows: Array, dtype) -> tuple[Array, tuple[Array, Array]]:
    """One path: ``(output [..., head_dim], (pre-activation 1, pre-activation 2))``.

    The pre-activations feed elastic pruning's zero counters; XLA drops them when unused."""
    w1, w2, w3 = (weights[name].astype(dtype) for name in WEIGHTS)
    a1 = jnp.dot(rows.astype(dtype), w1)
    a2 = jnp.dot(jax.nn.relu(a1), w2)
    return jnp.dot(jax.nn.relu(a2), w3), (a1, a2)


def predict(params: Mapping[str, Mapping[str, Array]], x: Float[Array, "b t d"], *, n_heads: int,
            block_size: int, dtype=jnp.float32) -> tuple[Array, Array]:
    """q̂, k̂ ([B, H, n_b, head_dim] each) of one layer from its normed input, as a pure function of
    ``params = {"q": {"w1", "w2", "w3"}, "k": {...}}``."""
    rows = block_rows(x, n_heads, block_size)
    return path_forward(params["q"], rows, dtype)[0], path_forward(params["k"], rows, dtype)[0]


def predicted_tiles(q_hat: Array, k_hat: Array) -> Float[Array, "b nb nb"]:
    """P[m, n] = Σ_h q̂_hm · k̂_hn in fp32 (n_b² entries: for training, not for fine-tuning)."""
    return jnp.einsum("bhmd,bhnd->bmn", q_hat, k_hat, preferred_element_type=jnp.float32)


def predicted_column_scores(q_hat: Array, k_hat: Array) -> Float[Array, "b nb"]:
    """ĉ_n = Σ_m P[m, n], computed as Σ_h k̂_hn · Σ_m q̂_hm: linear in n_b, no P."""
    q_sum = jnp.sum(q_hat.astype(jnp.float32), axis=2)  # [B, H, d]
    return jnp.einsum("bhnd,bhd->bn", k_hat.astype(jnp.float32), q_sum)


def _init(key, shape: tuple[int, int], gain: float) -> Array:
    return jax.random.normal(key, shape, jnp.float32) * np.sqrt(gain / shape[0])


class PredictorPath(nnx.Module):
    """Linear(in→h1) → ReLU → Linear(h1→h2) → ReLU → Linear(h2→out), no biases, fp32 weights."""

    def __init__(self, in_dim: int, widths: tuple[int, int], out_dim: int, *, rngs: nnx.Rngs):
        h1, h2 = widths
        if min(in_dim, h1, h2, out_dim) < 1:
            raise ValueError(f"predictor widths must be positive, got in={in_dim}, h1={h1}, "
                             f"h2={h2}, out={out_dim}.")
        self.w1 = PredictorParam(_init(rngs.params(), (in_dim, h1), 2.0))  # He init before ReLUs
        self.w2 = PredictorParam(_init(rngs.params(), (h1, h2), 2.0))
        self.w3 = PredictorParam(_init(rngs.params(), (h2, out_dim), 1.0))

    def weights(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in WEIGHTS}

    @property
    def widths(self) -> tuple[int, int]:
        return int(self.w1.shape[1]), int(self.w2.shape[1])


class LayerPredictor(nnx.Module):
    """The Q-side and K-side paths of one layer; ``column_scores(X)`` is what selection uses."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, block_size: int,
                 widths: Mapping[str, tuple[int, int]], dtype=jnp.float32, rngs: nnx.Rngs):
        self.n_heads, self.block_size, self.dtype = n_heads, block_size, dtype
        in_dim = block_size * (d_model // n_heads)
        self.q = PredictorPath(in_dim, tuple(widths["q"]), head_dim, rngs=rngs)
        self.k = PredictorPath(in_dim, tuple(widths["k"]), head_dim, rngs=rngs)

    def params(self) -> dict[str, dict[str, Array]]:
        return {"q": self.q.weights(), "k": self.k.weights()}

    def __call__(self, x: Float[Array, "b t d"]) -> tuple[Array, Array]:
        """(q̂, k̂) from ``stop_gradient(x)``."""
        return predict(self.params(), jax.lax.stop_gradient(x), n_heads=self.n_heads,
                       block_size=self.block_size, dtype=self.dtype)

    def column_scores(self, x: Float[Array, "b t d"]) -> Float[Array, "b nb"]:
        return predicted_column_scores(*self(x))

    def tiles(self, x: Float[Array, "b t d"]) -> Float[Array, "b nb nb"]:
        return predicted_tiles(*self(x))


def default_layer_ids(n_layers: int) -> tuple[int, ...]:
    """Every layer but the last (the artifact's set; the last layer is dense in ``schedule="half"``)."""
    return tuple(range(max(n_layers - 1, 1)))


class LeMoPredictors(nnx.Module):
    """One :class:`LayerPredictor` per layer in ``layer_ids``.

    ``widths[layer] = {"q": (h1, h2), "k": (h1, h2)}`` gives pruned widths (default: ``h1`` and
    ``h2 = block_size · d_model / n_heads`` everywhere). ``dtype`` is the compute dtype (default:
    the model's); weights are fp32.
    """

    def __init__(self, config: ModelConfig, *, block_size: int = 64,
                 layer_ids: Sequence[int] | None = None, h1: int = 128, h2: int | None = None,
                 widths: Mapping[int, Mapping[str, tuple[int, int]]] | None = None, dtype=None,
                 rngs: nnx.Rngs):
        if config.d_model % config.n_heads:
            raise ValueError(f"predictors slice d_model={config.d_model} into n_heads="
                             f"{config.n_heads} equal parts; it does not divide.")
        layer_ids = default_layer_ids(config.n_layers) if layer_ids is None else tuple(layer_ids)
        bad = [i for i in layer_ids if not 0 <= i < config.n_layers]
        if bad or len(set(layer_ids)) != len(layer_ids) or not layer_ids:
            raise ValueError(f"predictor layer_ids {layer_ids} must be distinct layers of a "
                             f"{config.n_layers}-layer model.")
        h2 = block_size * (config.d_model // config.n_heads) if h2 is None else h2
        widths = {int(k): v for k, v in (widths or {}).items()}
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.block_size = block_size
        self.model_shape = (config.d_model, config.n_heads, config.head_dim)
        dtype = config.compute_dtype if dtype is None else dtype
        self.layers = nnx.List([
            LayerPredictor(d_model=config.d_model, n_heads=config.n_heads, head_dim=config.head_dim,
                           block_size=block_size, widths=widths.get(i, {"q": (h1, h2), "k": (h1, h2)}),
                           dtype=dtype, rngs=rngs)
            for i in self.layer_ids])

    def for_layer(self, layer: int) -> LayerPredictor | None:
        if layer not in self.layer_ids:
            return None
        return self.layers[self.layer_ids.index(layer)]

    def params(self) -> dict[str, dict[str, dict[str, Array]]]:
        """``{str(layer): {"q": {...}, "k": {...}}}``: the pure pytree training works on."""
        return {str(i): p.params() for i, p in zip(self.layer_ids, self.layers, strict=True)}

    def set_params(self, params: Mapping[str, Mapping[str, Mapping[str, Array]]]) -> None:
        """Write ``params`` (same widths) into the weights."""
        for i, p in zip(self.layer_ids, self.layers, strict=True):
            for side in PATHS:
                path = getattr(p, side)
                for name in WEIGHTS:
                    new = params[str(i)][side][name]
                    if new.shape != getattr(path, name).shape:
                        raise ValueError(f"layer {i} {side}.{name}: shape {new.shape} != "
                                         f"{getattr(path, name).shape}; rebuild with its widths.")
                    getattr(path, name)[...] = jnp.asarray(new, jnp.float32)

    def widths(self) -> dict[int, dict[str, tuple[int, int]]]:
        return {i: {"q": p.q.widths, "k": p.k.widths}
                for i, p in zip(self.layer_ids, self.layers, strict=True)}

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self, PredictorParam)))

    def spec(self) -> dict:
        """JSON description (everything but the weights) that rebuilds the same structure."""
        d_model, n_heads, head_dim = self.model_shape
        return {"format": FORMAT, "block_size": self.block_size, "layer_ids": list(self.layer_ids),
                "d_model": d_model, "n_heads": n_heads, "head_dim": head_dim,
                "widths": {str(i): {s: list(w) for s, w in v.items()} for i, v in self.widths().items()},
                "num_params": self.num_params()}


def from_spec(spec: Mapping, config: ModelConfig, *, dtype=None, rngs: nnx.Rngs | None = None
              ) -> LeMoPredictors:
    """Predictors with the structure ``spec`` describes, for ``config`` (checked to match)."""
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"not a LeMo predictor checkpoint (format {spec.get('format')!r}, "
                              f"expected {FORMAT!r}).")
    ours = (config.d_model, config.n_heads, config.head_dim)
    theirs = (spec["d_model"], spec["n_heads"], spec["head_dim"])
    if ours != theirs or max(spec["layer_ids"]) >= config.n_layers:
        raise ValueError(f"predictors were trained for (d_model, n_heads, head_dim) = {theirs} and "
                         f"layers {spec['layer_ids']}; this model has {ours} and {config.n_layers} "
                         "layers.")
    widths = {int(i): {s: tuple(w) for s, w in v.items()} for i, v in spec["widths"].items()}
    return LeMoPredictors(config, block_size=spec["block_size"], layer_ids=spec["layer_ids"],
                          widths=widths, dtype=dtype, rngs=rngs or nnx.Rngs(0))


def save_predictors(predictors: LeMoPredictors, directory: str | os.PathLike, *, step: int = 0,
                    info: Mapping | None = None) -> None:
    """Write the predictors as their own checkpoint: weights + :meth:`LeMoPredictors.spec`."""
    with Checkpointer(directory, save_every=1, keep=1) as checkpointer:
        checkpointer.save(step, predictors.params(), {**predictors.spec(), "info": dict(info or {})},
                          force=True)


def load_predictors(directory: str | os.PathLike, config: ModelConfig, *, dtype=None
                    ) -> LeMoPredictors:
    """Predictors saved by :func:`save_predictors` (or ``train_predictors``), checked against
    ``config``; the stored (pruned) widths decide the shapes. Only reads: a missing ``directory`` is
    a :class:`CheckpointError` (it is not created)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"no predictors in {os.fspath(directory)}: the directory does not "
                                "exist; train them with `python -m experiments.train_predictors` first.")
    with Checkpointer(directory, save_every=1, read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise CheckpointError(f"no predictors in {os.fspath(directory)}: train them with "
                                  "`python -m experiments.train_predictors` first.")
        spec = checkpointer.restore_metadata()
        predictors = from_spec(spec, config, dtype=dtype)
        params, _ = checkpointer.restore(predictors.params())
    predictors.set_params(params)
    return predictors


def attach(model, predictors: LeMoPredictors) -> None:
    """Give ``model`` its predictors (``model.lemo_predictors``), checking they fit its shape."""
    c = model.config
    if predictors.model_shape != (c.d_model, c.n_heads, c.head_dim):
        raise ValueError(f"predictors expect (d_model, n_heads, head_dim) = {predictors.model_shape}; "
                         f"the model has {(c.d_model, c.n_heads, c.head_dim)}.")
    if max(predictors.layer_ids) >= c.n_layers:
        raise ValueError(f"predictors cover layers {predictors.layer_ids}; the model has "
                         f"{c.n_layers}.")
    model.lemo_predictors = predictors


def attached(model) -> LeMoPredictors | None:
    return getattr(model, "lemo_predictors", None)
