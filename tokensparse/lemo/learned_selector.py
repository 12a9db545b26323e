"""LeMo's learned selector: a per-token MLP on the layer's input that predicts how much the layer's
attention matters to each token, trained offline on the frozen model (``selector="learned"``).

Why: on SmolLM2-135M the spec's key-side oracle selects worse than random, and the best rule
measured (docs/lemo.md) is query-side: an eliminated token loses its own attention update, so keep the
tokens whose update matters most to their residual. Computing that exactly needs a dense attention
pass per sparse layer. This selector predicts it from the layer's input alone, per token::

    u_t = input_norm(h_t)                               (the tensor q/k/v_proj see; D values)
    r_t = log rms(h_t)                                  (one value: the residual's scale)
    s_t = w2 · ReLU(W1 u_t + w_r r_t + b1) + b2         (D → 64 → 1; one weight set per layer)
    score(block) = mean over its valid tokens of s_t    (exp(s_t) for a positive target)

Cost per token and sparse layer: ≈ 2·(D+1)·64 FLOPs (0.5 MFLOP on a 4096-wide model), no q·kᵀ.
``s_t`` is trained (:func:`fit`) on a per-token target measured on the frozen model inside the
LeMo sparse forward (:func:`collect`), either per token (``loss="token"``) or, as the shipped
weights were, on each window's block ranking (``loss="block"``, :func:`block_loss`), one of
:data:`TARGETS`:

- ``attention_ratio`` (the default; the shipped SmolLM2 weights): ‖a_t‖ / ‖h_t‖, the exact
  query-side rule; positive, ``s_t`` regresses its log and the block's score is the mean of
  ``exp(s_t)``.
- ``first_order``: the first-order loss change of keeping the token in this layer, as a query and
  as a key (:mod:`tokensparse.lemo.first_order`), scaled per (layer, window); a signed target,
  regressed as it is (Huber), so a block's score is the mean of ``s_t``: the predicted effect of
  keeping the block. The better rule as fixed selections, but noisy per token: trained on 8
  windows it overfits and selects no better than random on held-out English (docs/lemo.md).

Integration: the weights of all layers are stacked ``[n_layers, ...]`` (zeros for layers never
trained) in :class:`SelectorWeight` variables — not ``nnx.Param`` nor LoRA params, so no optimizer
touches them — on ``model.lemo_selector`` (:func:`attach`), and the rule indexes them with the traced
``layer.index``: the scan over layers stays one scan. Scores run on ``stop_gradient(h)``.

Files: :func:`save` / :func:`load` (``.npz``: the weights plus a JSON spec with :data:`FORMAT`, the
model shape and the layers trained). The repository ships SmolLM2-135M's (:func:`shipped_path`);
``tokensparse.zoo.load("smollm2-135m")`` attaches them. For other models:
``python -m experiments.train_selector``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

from tokensparse.config import LeMoConfig, ModelConfig
from tokensparse.lemo import first_order

FORMAT = "tokensparse.lemo.learned_selector/1"
HIDDEN = 64
WEIGHTS = ("w1", "w_rms", "b1", "w2", "b2")
TRAIN_COMMAND = "python -m experiments.train_selector --base=<model> --out=<file.npz>"
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
SHIPPED = {"smollm2-135m": "smollm2-135m.npz"}


class SelectorWeight(nnx.Variable):
    """A learned-selector weight: frozen during fine-tuning, trained only by :func:`fit`."""


# ----------------------------------------------------------------------------- the math


def features(u: Float[Array, "b t d"], h: Float[Array, "b t d"]) -> tuple[Array, Array]:
    """``(u, log rms(h))`` in fp32: the selector's per-token inputs (``u`` the normed input)."""
    hf = h.astype(jnp.float32)
    log_rms = 0.5 * jnp.log(jnp.maximum(jnp.mean(hf * hf, axis=-1), 1e-12))
    return u.astype(jnp.float32), log_rms


def token_logits(params: dict[str, Array], u: Float[Array, "... d"], log_rms: Float[Array, "..."]
                 ) -> Float[Array, "..."]:
    """``s_t`` of one layer's weights (``params`` unstacked: w1 [D, H], w_rms [H], b1 [H], w2 [H],
    b2 [])."""
    hidden = jnp.dot(u, params["w1"]) + log_rms[..., None] * params["w_rms"] + params["b1"]
    return jnp.dot(jax.nn.relu(hidden), params["w2"]) + params["b2"]


def block_mean(x: Float[Array, "b t"], block_size: int, valid=None) -> Float[Array, "b nb"]:
    """Mean of ``x`` over each block's valid tokens (−inf for a block without any); T is padded up
    to whole blocks."""
    b, t = x.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid
    nb = -(-t // block_size)
    pad = ((0, 0), (0, nb * block_size - t))
    x = jnp.pad(jnp.where(valid, x, 0.0), pad).reshape(b, nb, block_size)
    count = jnp.pad(valid, pad).reshape(b, nb, block_size).sum(-1)
    return jnp.where(count > 0, x.sum(-1) / jnp.maximum(count, 1), -jnp.inf)


SIGNED = frozenset({"first_order"})  # targets regressed as they are (else their log)


def token_values(s: Float[Array, "..."], target: str) -> Float[Array, "..."]:
    """What a block's score averages: ``s_t`` for a signed target, ``exp(s_t)`` for a log-regressed
    one."""
    return s if target in SIGNED else jnp.exp(jnp.minimum(s, 30.0))


def block_scores(params: dict[str, Array], u, h, block_size: int, valid=None,
                 target: str = "attention_ratio") -> Float[Array, "b nb"]:
    """One layer's block scores: the block mean of :func:`token_values`. No gradient reaches the
    inputs or the weights (selection is discrete; the weights are trained by :func:`fit` alone)."""
    s = token_logits(params, *features(u, h))
    return jax.lax.stop_gradient(block_mean(token_values(s, target), block_size, valid))


def flops_per_token(d_model: int, hidden: int = HIDDEN) -> int:
    """Matmul FLOPs of the selector per token and sparse layer (2 per multiply-add)."""
    return 2 * (d_model + 1) * hidden + 2 * hidden


# ----------------------------------------------------------------------------- the module


class LearnedSelector(nnx.Module):
    """Stacked per-layer selector weights of a model with ``n_layers`` layers of width ``d_model``.

    ``layers``: the layers the weights were trained for (others hold zeros and may not be used);
    ``target``: the name of the per-token target (:data:`TARGETS`); ``info``: free-form provenance
    (training data, steps) kept in the file."""

    def __init__(self, n_layers: int, d_model: int, *, layers: Sequence[int], hidden: int = HIDDEN,
                 target: str = "attention_ratio", info: dict | None = None):
        if min(n_layers, d_model, hidden) < 1:
            raise ValueError(f"LearnedSelector needs positive n_layers, d_model and hidden, got "
                             f"{n_layers}, {d_model}, {hidden}.")
        if target not in TARGETS:
            raise ValueError(f"unknown learned-selector target {target!r}; known: {tuple(TARGETS)}.")
        layers = tuple(sorted(int(i) for i in layers))
        if not layers or len(set(layers)) != len(layers) or not 0 <= layers[0] <= layers[-1] < n_layers:
            raise ValueError(f"LearnedSelector layers {layers} must be distinct layers of a "
                             f"{n_layers}-layer model.")
        self.model_shape = (n_layers, d_model)
        self.layers = layers
        self.target = target
        self.info = dict(info or {})
        zeros = lambda *shape: SelectorWeight(jnp.zeros((n_layers, *shape), jnp.float32))
        self.w1, self.w_rms, self.b1, self.w2, self.b2 = (
            zeros(d_model, hidden), zeros(hidden), zeros(hidden), zeros(hidden), zeros())

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[-1])

    def params(self) -> dict[str, Array]:
        """The stacked weights ``{name: [n_layers, ...]}``."""
        return {name: getattr(self, name)[...] for name in WEIGHTS}

    def set_params(self, params: dict[str, Array]) -> None:
        for name in WEIGHTS:
            new = jnp.asarray(params[name], jnp.float32)
            if new.shape != getattr(self, name).shape:
                raise ValueError(f"learned selector weight {name}: shape {new.shape} != "
                                 f"{getattr(self, name).shape}.")
            getattr(self, name)[...] = new

    def layer_params(self, index) -> dict[str, Array]:
        """One layer's weights; ``index`` may be traced (the loop's ``layer.index``)."""
        return {name: getattr(self, name)[...][index] for name in WEIGHTS}

    def spec(self) -> dict:
        n_layers, d_model = self.model_shape
        return {"format": FORMAT, "n_layers": n_layers, "d_model": d_model, "hidden": self.hidden,
                "layers": list(self.layers), "target": self.target, "info": self.info}


def check_shape(spec: dict, config: ModelConfig, source: str = "the learned selector") -> None:
    """Raise ``ValueError`` unless ``spec`` was trained for ``config``'s (n_layers, d_model)."""
    ours = (config.n_layers, config.d_model)
    theirs = (spec["n_layers"], spec["d_model"])
    if ours != theirs:
        raise ValueError(f"{source} was trained for a model with (n_layers, d_model) = {theirs}; "
                         f"this model has {ours}. Train one for it: {TRAIN_COMMAND}.")


def save(selector: LearnedSelector, path: str | os.PathLike, dtype=np.float32) -> None:
    """Write ``selector`` to ``path`` (``.npz``: its weights, stored as ``dtype``, and ``spec`` as
    JSON; :func:`load` reads them back as fp32)."""
    arrays = {name: np.asarray(value).astype(dtype) for name, value in selector.params().items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, spec=np.asarray(json.dumps(selector.spec())), **arrays)


def load(path: str | os.PathLike, config: ModelConfig | None = None) -> LearnedSelector:
    """A selector saved by :func:`save`; with ``config``, checked to fit that model's shape."""
    with np.load(path, allow_pickle=False) as f:
        if "spec" not in f.files:
            raise ValueError(f"{os.fspath(path)} is not a learned-selector file (no spec).")
        spec = json.loads(str(f["spec"]))
        arrays = {name: f[name] for name in WEIGHTS if name in f.files}
    if spec.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)}: format {spec.get('format')!r}, expected {FORMAT!r}.")
    if config is not None:
        check_shape(spec, config, os.fspath(path))
    selector = LearnedSelector(spec["n_layers"], spec["d_model"], layers=spec["layers"],
                               hidden=spec["hidden"], target=spec["target"], info=spec.get("info"))
    selector.set_params(arrays)
    return selector


def attach(model, selector: LearnedSelector) -> None:
    """Give ``model`` its selector (``model.lemo_selector``), checking that the shapes fit."""
    check_shape(selector.spec(), model.config)
    model.lemo_selector = selector


def attached(model) -> LearnedSelector | None:
    return getattr(model, "lemo_selector", None)


def shipped_path(name: str) -> pathlib.Path | None:
    """The weights the repository ships for zoo model ``name`` (None when there are none)."""
    file = SHIPPED.get(name)
    return None if file is None else WEIGHTS_DIR / file


# ----------------------------------------------------------------------------- the rule


def require_attached(model) -> LearnedSelector:
    """The selector attached to ``model``; a ``ValueError`` naming how to get one if none is."""
    selector = attached(model)
    if selector is None:
        raise ValueError("LeMoConfig.selector='learned' needs learned-selector weights on the model "
                         "(tokensparse.zoo.load attaches SmolLM2-135M's); for other models train "
                         f"them with `{TRAIN_COMMAND}` and attach them with "
                         "tokensparse.lemo.learned_selector.attach(model, load(path)), or pass "
                         "--config.lemo.selector_weights=<file.npz> to experiments.finetune.")
    return selector


def check(model, lemo: LeMoConfig, ratios: Sequence[float]) -> None:
    """``ValueError`` unless ``model`` carries a selector trained for every sparse layer (a schedule
    with no sparse layer selects nothing and needs none)."""
    if all(r >= 1.0 for r in ratios):
        return
    selector = require_attached(model)
    missing = [i for i, r in enumerate(ratios) if r < 1.0 and i not in selector.layers]
    if missing:
        raise ValueError(f"layers {missing} are sparse but the learned selector was trained for "
                         f"layers {list(selector.layers)}; retrain with `{TRAIN_COMMAND}` "
                         "--layers covering them, or change the schedule.")


def bind(model, lemo: LeMoConfig):
    """The ``learned`` rule's score function for ``model`` (weights indexed by ``layer.index``)."""
    selector = attached(model)

    def score(block, h, layer, lemo):
        if selector is None:  # a sparse layer is selecting: say what is missing
            check(model, lemo, (0.0,))
        valid = None if layer.segment_ids is None else layer.segment_ids >= 0
        params = selector.layer_params(layer.index)
        return block_scores(params, block.input_norm(h), h, lemo.block_size, valid,
                            selector.target)
    return score


# ----------------------------------------------------------------------------- training data


def token_ratio(block, h: Float[Array, "b t d"], positions, segment_ids=None) -> Float[Array, "b t"]:
    """‖a_t‖ / ‖h_t‖ with ``a`` the layer's dense attention output: the ``attention_ratio`` target."""
    a = block.attn(block.input_norm(h), positions, segment_ids).astype(jnp.float32)
    hf = h.astype(jnp.float32)
    return jnp.linalg.norm(a, axis=-1) / jnp.maximum(jnp.linalg.norm(hf, axis=-1), 1e-6)


TARGETS = ("attention_ratio", "first_order")


def _router(model, lemo: LeMoConfig | None):
    """``(router, kinds)`` of ``lemo``'s sparse forward; ``(None, None)``: the dense one."""
    from tokensparse.lemo.selection import layer_kinds, lemo_router

    if lemo is None:
        return None, None
    return lemo_router(model, lemo), layer_kinds(lemo, lemo.keep_ratios(len(model.layers)))


@nnx.jit(static_argnames=("lemo",))
def _ratio_data(model, tokens, lemo: LeMoConfig | None):
    from tokensparse.lemo.forward import lemo_layer_fn
    from tokensparse.llama import default_positions, dense_layer

    run = dense_layer if lemo is None else lemo_layer_fn(model, lemo)

    def layer_fn(block, h, layer, selection):
        u = block.input_norm(h)
        out = (u.astype(jnp.bfloat16), features(u, h)[1],
               token_ratio(block, h, layer.positions, layer.segment_ids))
        return run(block, h, layer, selection)[0], out

    router, kinds = _router(model, lemo)
    _, outputs = model.run_layers(model.embed(tokens), default_positions(tokens), layer_fn=layer_fn,
                                  router=router, kinds=kinds)
    return outputs


@nnx.jit(static_argnames=("lemo", "block_size", "start"))
def _first_order_data(model, tokens, lemo: LeMoConfig | None, block_size: int, start: int):
    value, outputs = first_order.importance(model, tokens, *_router(model, lemo), start=start)
    value = first_order.normalised(value, block_size)
    return [None] * start + [(u, log_rms, value[start + i])
                             for i, (u, log_rms, _) in enumerate(outputs)]


def collect(model, windows: Iterable[np.ndarray], layers: Sequence[int],
            target: str = "attention_ratio", sparse: Sequence[LeMoConfig] = (), block_size: int = 64
            ) -> dict[str, np.ndarray]:
    """Training data from the frozen model: per layer in ``layers``, every token's normed input
    ``u`` [L, N, D] (bf16), ``log_rms`` [L, N] and ``target`` [L, N] (``windows``: token arrays of
    one length, run one at a time; ``first_order`` is scaled per (layer, window) with the tokens
    after the first ``block_size``).

    With ``sparse`` configs, window i is run through the LeMo sparse forward of
    ``sparse[i % len(sparse)]`` (its selector choosing, e.g. the exact ``attention_ratio``) instead
    of the dense one: the selector then learns on the inputs it meets inside the sparse forward,
    where earlier layers have eliminated tokens (trained on dense inputs only, it cannot react to
    that, and selects far worse in the loop), and ``first_order`` measures keeping a token against
    that forward's selections."""
    if target not in TARGETS:
        raise ValueError(f"unknown learned-selector target {target!r}; known: {TARGETS}.")
    parts = {"u": [], "log_rms": [], "target": []}
    for w, window in enumerate(windows):
        lemo = sparse[w % len(sparse)] if sparse else None
        tokens = jnp.asarray(window, jnp.int32)[None]
        if target == "first_order":
            outputs = _first_order_data(model, tokens, lemo, block_size, min(layers))
        else:
            outputs = _ratio_data(model, tokens, lemo)
        for key, j in (("u", 0), ("log_rms", 1), ("target", 2)):
            parts[key].append(np.stack([np.asarray(outputs[i][j][0]) for i in layers]))
    return {key: np.concatenate(value, axis=1) for key, value in parts.items()}


# ----------------------------------------------------------------------------- training


def init_params(n_layers: int, d_model: int, hidden: int = HIDDEN, seed: int = 0) -> dict[str, Array]:
    """Random stacked weights (He init before the ReLU, zero output weights' bias)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w1": jax.random.normal(k1, (n_layers, d_model, hidden)) * np.sqrt(2.0 / d_model),
            "w_rms": jnp.zeros((n_layers, hidden)), "b1": jnp.zeros((n_layers, hidden)),
            "w2": jax.random.normal(k2, (n_layers, hidden)) * np.sqrt(1.0 / hidden),
            "b2": jnp.zeros((n_layers,))}


def regression_target(target: np.ndarray, kind: str) -> np.ndarray:
    """What ``s_t`` regresses: a signed target as it is, a positive one's log."""
    if kind in SIGNED:
        return np.asarray(target, np.float32)
    return np.log(np.maximum(target, 1e-8)).astype(np.float32)


def regression_loss(params, u, log_rms, y, huber: float = 0.0) -> Float[Array, ""]:
    """Mean squared error of ``s_t`` against ``y`` (Huber with threshold ``huber`` when > 0: the
    heavy-tailed first-order target), over the layers (leading axis) and tokens."""
    pred = jax.vmap(token_logits)(params, u.astype(jnp.float32), log_rms)
    if huber > 0:
        return jnp.mean(optax.huber_loss(pred, y, delta=huber))
    return jnp.mean((pred - y) ** 2)


LOSSES = ("token", "block")


def block_loss(params, u, log_rms, target, kind: str, block_size: int, token_weight: float = 0.1
               ) -> Float[Array, ""]:
    """The ``"block"`` loss of :func:`fit`: over whole windows ``u`` [L, W, T, D] (``log_rms``,
    ``target`` [L, W, T]), the squared error of each block's predicted score against its exact one,
    centred per window (only the ranking within a window matters to selection), plus
    ``token_weight`` × the token loss. Scores are compared as logs for a positive target, as they
    are for a signed one."""
    pred = jax.vmap(token_logits)(params, u.astype(jnp.float32), log_rms)
    y = target if kind in SIGNED else jnp.log(jnp.maximum(target, 1e-8))
    lead = pred.shape[:-1]
    blocks = lambda x: x.reshape(*lead, -1, block_size).mean(-1)
    if kind in SIGNED:
        pb, yb = blocks(pred), blocks(target)
        token = optax.huber_loss(pred, y, delta=1.0)
    else:
        pb = jnp.log(blocks(token_values(pred, kind)))
        yb = jnp.log(jnp.maximum(blocks(target), 1e-8))
        token = (pred - y) ** 2
    centred = lambda x: x - x.mean(-1, keepdims=True)
    return jnp.mean((centred(pb) - centred(yb)) ** 2) + token_weight * jnp.mean(token)


def fit(data: dict[str, np.ndarray], *, target: str = "attention_ratio", steps: int = 2000,
        batch: int = 2048, lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
        hidden: int = HIDDEN, loss: str = "token", window: int | None = None, block_size: int = 64,
        log_every: int = 0) -> tuple[dict, list[float]]:
    """Train stacked weights for the layers in ``data`` (from :func:`collect` with ``target``) by
    Adam over random minibatches: ``(params [L, ...], losses)``.

    ``loss="token"``: :func:`regression_loss` (Huber, threshold 1, for a signed target) on ``batch``
    random tokens. ``loss="block"``: :func:`block_loss` on ``batch // window`` random whole windows
    (``window`` tokens each, the length ``data`` was collected at): it fits what selection uses,
    the ranking of blocks within a window, and measured better on SmolLM2 (docs/lemo.md)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown learned-selector loss {loss!r}; known: {LOSSES}.")
    u, log_rms = data["u"], data["log_rms"]
    y = regression_target(data["target"], target)
    huber = 1.0 if target in SIGNED else 0.0
    n_layers, n, d = u.shape
    if loss == "block" and (window is None or window % block_size or n % window):
        raise ValueError(f"loss='block' needs window, a multiple of block_size={block_size} that "
                         f"divides the {n} tokens of data, got window={window}.")
    params = init_params(n_layers, d, hidden=hidden, seed=seed)
    params["b2"] = jnp.asarray(y.mean(axis=1))
    opt = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=weight_decay)
    state = opt.init(params)
    u_dev, r_dev = jnp.asarray(u), jnp.asarray(log_rms)
    t_dev = jnp.asarray(y if loss == "token" else data["target"], jnp.float32)

    def loss_of(params, idx, u, r, t):
        if loss == "token":
            take = lambda x: jnp.take(x, idx, axis=1)
            return regression_loss(params, take(u), take(r), take(t), huber)
        take = lambda x: jnp.take(x.reshape(n_layers, n // window, window, *x.shape[2:]), idx, axis=1)
        return block_loss(params, take(u), take(r), take(t), target, block_size)

    @jax.jit
    def step(params, state, idx, u, r, t):  # the data are arguments, not captured constants
        value, grads = jax.value_and_grad(loss_of)(params, idx, u, r, t)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        if loss == "token":
            idx = rng.integers(0, n, size=min(batch, n))
        else:
            idx = rng.choice(n // window, size=min(max(batch // window, 1), n // window), replace=False)
        params, state, value = step(params, state, jnp.asarray(idx), u_dev, r_dev, t_dev)
        losses.append(value)  # on the device: fetched once at the end, not every step
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i}: loss {float(value):.4f}", flush=True)
    return params, [float(v) for v in jax.device_get(losses)]


def stacked(params_for_layers: dict[str, Array], layers: Sequence[int], n_layers: int
            ) -> dict[str, np.ndarray]:
    """Weights of ``layers`` (leading axis in that order) placed in a zero ``[n_layers, ...]``
    stack."""
    out = {}
    for name, value in params_for_layers.items():
        value = np.asarray(value, np.float32)
        full = np.zeros((n_layers, *value.shape[1:]), np.float32)
        full[list(layers)] = value
        out[name] = full
    return out


# ----------------------------------------------------------------------------- quality


def predicted_blocks(params: dict[str, Array], data: dict[str, np.ndarray], block_size: int,
                     target: str = "attention_ratio") -> np.ndarray:
    """Block scores [L, N / block_size] of stacked weights trained on ``target`` (one per layer of
    ``data``, from :func:`collect`, whose N tokens are whole windows of whole blocks), one layer at
    a time."""
    out = []
    for i in range(data["u"].shape[0]):
        p = {name: value[i] for name, value in params.items()}
        s = token_logits(p, jnp.asarray(data["u"][i], jnp.float32), jnp.asarray(data["log_rms"][i]))
        out.append(np.asarray(token_values(s, target).reshape(-1, block_size).mean(-1)))
    return np.stack(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def ranking_metrics(predicted: np.ndarray, exact: np.ndarray, *, blocks_per_window: int,
                    keeps: Sequence[float] = (0.4, 0.7), keep_first_block: bool = True) -> dict:
    """How well ``predicted`` block scores rank blocks like ``exact`` ([L, N] each, N a multiple of
    ``blocks_per_window``): the mean Spearman correlation per (layer, window), and per keep ratio the
    mean recall of the exact top ``floor(keep · n_b)`` blocks (block 0 forced into both when
    ``keep_first_block``, as the LeMo forward does)."""
    n_layers = predicted.shape[0]
    p = predicted.reshape(n_layers, -1, blocks_per_window).astype(np.float64)
    e = exact.reshape(n_layers, -1, blocks_per_window).astype(np.float64)
    rp, re = _ranks(p), _ranks(e)
    rp, re = rp - rp.mean(-1, keepdims=True), re - re.mean(-1, keepdims=True)
    rho = (rp * re).sum(-1) / np.sqrt((rp * rp).sum(-1) * (re * re).sum(-1))
    out = {"spearman": float(rho.mean())}
    if keep_first_block:
        p, e = p.copy(), e.copy()
        p[..., 0] = e[..., 0] = np.inf
    for keep in keeps:
        k = max(1, int(keep * blocks_per_window))
        top_p = np.argsort(-p, axis=-1)[..., :k]
        top_e = np.argsort(-e, axis=-1)[..., :k]
        hits = (top_p[..., :, None] == top_e[..., None, :]).any(-1).sum(-1)
        out[f"recall@{keep}"] = float((hits / k).mean())
    return out
