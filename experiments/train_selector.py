"""Train LeMo's learned selector (``LeMoConfig.selector="learned"``) for a frozen base.

    python -m experiments.train_selector --base=smollm2-135m --out=selector.npz \\
        [--target=attention_ratio --windows=48 --seq_len=1024 --steps=3000 --layers=14-28 \\
         --sparse_keeps=0.7,0.4,0.55,0.85]

Per layer, a per-token MLP on the layer's normed input learns to predict the exact query-side
importance (``--target=attention_ratio``: ‖attention output‖ / ‖residual input‖) or each token's
first-order importance (``first_order``: the loss change of keeping it in that layer, as a query
and as a key; :mod:`tokensparse.lemo.first_order`; a forward and a backward per window), on the
layer inputs of the LeMo sparse forward with the exact ``attention_ratio`` rule selecting
(``--sparse_keeps``, in turn per window; see :mod:`tokensparse.lemo.learned_selector`). Training
windows come from the training split of the library's Shakespeare corpus, tokenised with the
base's tokenizer; quality (recall of the target's top blocks and Spearman, per keep ratio) is
measured on windows of the validation split, run the same way, and stored in the file's ``info``
beside the data and settings. Deterministic for a given ``--seed`` on one machine. Attach the result
with ``learned_selector.attach(model, learned_selector.load(path, config))``; SmolLM2-135M's ships
with the library (``tokensparse/lemo/weights/``) and ``zoo.load`` attaches it.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments import _checks
from tokensparse import data
from tokensparse.config import LeMoConfig
from tokensparse.lemo import learned_selector as ls

_BASE = flags.DEFINE_string("base", "smollm2-135m", "A zoo model name, a pretraining workdir or a "
                            "Hugging Face directory (tokensparse.pipelines.base.load_base).")
_OUT = flags.DEFINE_string("out", None, "Where to write the selector (.npz).", required=True)
_WINDOWS = flags.DEFINE_integer("windows", 48, "Training windows (Shakespeare train split).")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 4, "Validation windows for recall/Spearman.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per window (a multiple of --block_size).")
_BLOCK = flags.DEFINE_integer("block_size", 64, "LeMo block size the quality metrics use.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch", 2048, "Tokens per step (per layer).")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (cosine decay).")
_LAYERS = flags.DEFINE_string("layers", "all", "Layers to train: all, a range a-b (inclusive) or a "
                              "comma list of indices.")
_TARGET = flags.DEFINE_enum("target", "attention_ratio", list(ls.TARGETS), "Per-token target.")
_SEED = flags.DEFINE_integer("seed", 0, "Window sampling and initialisation seed.")
_SPARSE_KEEPS = flags.DEFINE_list(
    "sparse_keeps", ["0.7", "0.4", "0.55", "0.85"], "Training windows run through the LeMo sparse "
    "forward (half schedule, block 0 kept) with the exact attention_ratio rule selecting, at these "
    "keep ratios in turn, so the selector learns on the inputs it meets there; empty: the dense "
    "forward (measured far worse in the loop).")

_checks.at_least(_WINDOWS, 1)
_checks.at_least(_EVAL_WINDOWS, 1)
_checks.at_least(_STEPS, 1)
_checks.at_least(_BATCH, 1)


def split_windows(tokenizer, split: str, seq_len: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` windows of ``seq_len`` tokens at random offsets of the ``split`` works that are long
    enough, cycling through them in name order."""
    corpus = data.load_corpus("shakespeare")
    docs = sorted(getattr(corpus, split), key=lambda d: d.name)
    encoded = [np.asarray(tokenizer.encode(d.text).ids, np.int32) for d in docs]
    encoded = [e for e in encoded if len(e) >= seq_len]
    if not encoded:
        raise app.UsageError(f"no {split} work has {seq_len} tokens.")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        doc = encoded[i % len(encoded)]
        start = int(rng.integers(0, len(doc) - seq_len + 1))
        out.append(doc[start:start + seq_len])
    return out


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    if spec == "all":
        return tuple(range(n_layers))
    try:
        if "-" in spec:
            first, last = (int(x) for x in spec.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(sorted({int(x) for x in spec.split(",")}))
    except ValueError:
        raise app.UsageError(f"--layers={spec!r} must be 'all', a range a-b or a comma list of "
                             "ints.") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise app.UsageError(f"--layers={spec!r}: the model has layers 0..{n_layers - 1}.")
    return layers


def collect(model, windows, layers, sparse, t0: float) -> dict[str, np.ndarray]:
    """:func:`learned_selector.collect` a round of ``len(sparse)`` windows at a time (the same
    data), printing progress."""
    step = max(len(sparse), 1)
    parts = []
    for i in range(0, len(windows), step):
        parts.append(ls.collect(model, windows[i:i + step], layers, _TARGET.value, sparse=sparse,
                                block_size=_BLOCK.value))
        print(f"collected {min(i + step, len(windows))}/{len(windows)} windows "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {key: np.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}


def main(argv):
    del argv
    from tokensparse.pipelines.base import load_base

    if _SEQ_LEN.value % _BLOCK.value:
        raise app.UsageError(f"--seq_len={_SEQ_LEN.value} must be a multiple of --block_size.")
    t0 = time.perf_counter()
    model, config, tokenizer = load_base(_BASE.value)  # a base without a tokenizer is refused
    layers = parse_layers(_LAYERS.value, config.n_layers)
    train = split_windows(tokenizer, "train", _SEQ_LEN.value, _WINDOWS.value, _SEED.value)
    valid = split_windows(tokenizer, "validation", _SEQ_LEN.value, _EVAL_WINDOWS.value, _SEED.value)
    sparse = [LeMoConfig(keep_ratio=float(k), selector="attention_ratio", mlp_mode="dense",
                         keep_first_block=True, block_size=_BLOCK.value) for k in _SPARSE_KEEPS.value]
    train_data = collect(model, train, layers, sparse, t0)
    valid_data = collect(model, valid, layers, sparse, t0)
    params, losses = ls.fit(train_data, target=_TARGET.value, steps=_STEPS.value,
                            batch=_BATCH.value, lr=_LR.value, seed=_SEED.value,
                            log_every=max(_STEPS.value // 10, 1))
    nb = _SEQ_LEN.value // _BLOCK.value
    exact = valid_data["target"].reshape(len(layers), -1, _BLOCK.value).mean(-1)
    predicted = ls.predicted_blocks(params, valid_data, _BLOCK.value, _TARGET.value)
    quality = ls.ranking_metrics(predicted, exact, blocks_per_window=nb,
                                 keeps=(0.4, 0.55, 0.7, 0.85))
    info = {"base": _BASE.value, "corpus": "shakespeare train split", "windows": _WINDOWS.value,
            "seq_len": _SEQ_LEN.value, "steps": _STEPS.value, "batch": _BATCH.value,
            "lr": _LR.value, "seed": _SEED.value, "final_loss": losses[-1],
            "sparse_keeps": [float(k) for k in _SPARSE_KEEPS.value], "target": _TARGET.value,
            "selector_in_collection": "attention_ratio",
            "validation": {"windows": _EVAL_WINDOWS.value, "block_size": _BLOCK.value, **quality}}
    selector = ls.LearnedSelector(config.n_layers, config.d_model, layers=layers,
                                  target=_TARGET.value, info=info)
    selector.set_params(ls.stacked(params, layers, config.n_layers))
    ls.save(selector, _OUT.value)
    print(f"wrote {_OUT.value}: validation {quality} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    app.run(main)
