"""Train LeMo's learned selector (``LeMoConfig.selector="learned"``) for a frozen base.

    python -m experiments.train_selector --base=smollm2-135m --out=selector.npz \\
        [--target=attention_ratio --windows=48 --seq_len=1024 --steps=3000 --layers=14-28 \\
         --sparse_keeps=0.7,0.4,0.55,0.85 --hidden=64 --loss=block]

Per layer, a per-token MLP on the layer's normed input learns to predict the exact query-side
importance (``--target=attention_ratio``: ‖attention output‖ / ‖residual input‖) or each token's
first-order importance (``first_order``: the loss change of keeping it in that layer, as a query
and as a key; :mod:`tokensparse.lemo.first_order`; a forward and a backward per window), on the
layer inputs of the LeMo sparse forward with the exact ``attention_ratio`` rule selecting
(``--sparse_keeps``, in turn per window; see :mod:`tokensparse.lemo.learned_selector`). Training
windows come from the training split of the library's Shakespeare corpus, tokenised with the
base's tokenizer; quality (recall of the target's top blocks and Spearman, per keep ratio) is
measured on windows of the validation split, run the same way, and stored in the file's ``info``
beside the data and settings. Deterministic for a given ``--seed`` on one machine. Fine-tune with the
result with ``experiments.finetune --config.lemo.selector_weights=PATH``, or attach it with
``learned_selector.attach(model, learned_selector.load(path, config))``; SmolLM2-135M's ships with
the library (``tokensparse/lemo/weights/``) and ``zoo.load`` attaches it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import pathlib
import time

import numpy as np
from absl import app, flags

from experiments import _checks
from experiments.selector_windows import parse_layers, split_windows
from tokensparse.config import LeMoConfig
from tokensparse.data import heldout
from tokensparse.lemo import learned_selector as ls

_BASE = flags.DEFINE_string("base", "smollm2-135m", "A zoo model name, a pretraining workdir or a "
                            "Hugging Face directory (tokensparse.pipelines.base.load_base).")
_OUT = flags.DEFINE_string("out", None, "Where to write the selector (.npz).", required=True)
_WINDOWS = flags.DEFINE_integer("windows", 48, "Training windows (Shakespeare train split).")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 4, "Validation windows for recall/Spearman.")
_ENGLISH = flags.DEFINE_integer(
    "english_windows", 4, "Held-out English windows (tokensparse.data.heldout; never trained on) "
    "on which recall/Spearman are also reported; 0: none.")
_EXTRA_TEXT = flags.DEFINE_list(
    "extra_text", [], "Text files (globs, UTF-8) whose windows join the training data beside "
    "Shakespeare's: more varied English for a selector that must generalise. The held-out English "
    "(tokensparse.data.heldout) is refused.")
_EXTRA_WINDOWS = flags.DEFINE_integer("extra_windows", 0, "Training windows drawn from --extra_text "
                                      "(random offsets in its files, concatenated in name order).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per window (a multiple of --block_size).")
_BLOCK = flags.DEFINE_integer("block_size", 64, "LeMo block size the quality metrics use.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch", 4096, "Tokens per step (per layer); --loss=block takes "
                              "batch // seq_len whole windows.")
_HIDDEN = flags.DEFINE_integer("hidden", ls.HIDDEN, "Width of the selector's hidden layer.")
_LOSS = flags.DEFINE_enum("loss", "block", list(ls.LOSSES), "block: fit each window's block "
                          "ranking (centred block log-scores, plus 0.1 x the token loss); token: "
                          "regress every token's target.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
_DATA_CACHE = flags.DEFINE_string(
    "data_cache", None, "A directory for the collected training and validation data (one .npz per "
    "setting of base, windows, lengths, layers, target and sparse keeps): reused when present, so "
    "refitting with other --steps/--hidden/--loss/--lr skips the collection.")
_DTYPE = flags.DEFINE_enum("weights_dtype", "float16", ["float16", "float32"],
                           "Storage type of the saved weights (read back as float32).")
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
_checks.at_least(_ENGLISH, 0)
_checks.at_least(_STEPS, 1)
_checks.at_least(_BATCH, 1)
_checks.at_least(_HIDDEN, 1)
_checks.at_least(_EXTRA_WINDOWS, 0)


@flags.multi_flags_validator(["extra_text", "extra_windows"],
                             "--extra_text and --extra_windows go together: give both or neither.")
def _extra_pair(values) -> bool:
    return bool(values["extra_text"]) == bool(values["extra_windows"])


def extra_files(patterns: list[str]) -> list[pathlib.Path]:
    """The files ``patterns`` (globs) name, sorted and de-duplicated; the held-out English refused."""
    files = sorted({pathlib.Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True)
                    if pathlib.Path(p).is_file()})
    if not files:
        raise app.UsageError(f"--extra_text={','.join(patterns)} names no file.")
    heldout_text = heldout.english_text()
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text and text in heldout_text:
            raise app.UsageError(f"--extra_text: {f} is (part of) the held-out English text, which "
                                 "the selector must never train on.")
    return files


def extra_windows(tokenizer, files: list[pathlib.Path], seq_len: int, count: int, seed: int
                  ) -> list[np.ndarray]:
    """``count`` windows of ``seq_len`` tokens at random offsets of ``files``' text (concatenated in
    order, blank lines between)."""
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    if len(ids) < seq_len:
        raise app.UsageError(f"--extra_text has {len(ids)} tokens, fewer than --seq_len={seq_len}.")
    rng = np.random.default_rng(seed + 1)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=count)
    return [ids[int(a):int(a) + seq_len] for a in starts]


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


def held_out_quality(params, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Recall of the exact rule's top blocks per keep ratio and Spearman, on collected ``data``."""
    exact = data["target"].reshape(data["target"].shape[0], -1, _BLOCK.value).mean(-1)
    predicted = ls.predicted_blocks(params, data, _BLOCK.value, _TARGET.value)
    return ls.ranking_metrics(predicted, exact, blocks_per_window=_SEQ_LEN.value // _BLOCK.value,
                              keeps=(0.4, 0.55, 0.7, 0.85))


def cached(name: str, settings: dict, make) -> dict[str, np.ndarray]:
    """``make()``'s data, read from / written to ``--data_cache`` when that flag is set."""
    if _DATA_CACHE.value is None:
        return make()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = pathlib.Path(_DATA_CACHE.value) / f"{name}-{key}.npz"
    if path.exists():
        with np.load(path) as f:
            print(f"read {name} data from {path}", flush=True)
            return {k: f[k] for k in f.files}
    # Stored as read back (inputs in float16), so fresh and cached data always concatenate.
    out = {k: v.astype(np.float16) if k == "u" else v for k, v in make().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)  # a partial file is never read back
    return out


def main(argv):
    del argv
    from tokensparse.pipelines.base import load_base

    if _SEQ_LEN.value % _BLOCK.value:
        raise app.UsageError(f"--seq_len={_SEQ_LEN.value} must be a multiple of --block_size.")
    files = extra_files(_EXTRA_TEXT.value) if _EXTRA_WINDOWS.value else []  # bad input fails first
    t0 = time.perf_counter()
    model, config, tokenizer = load_base(_BASE.value)  # a base without a tokenizer is refused
    layers = parse_layers(_LAYERS.value, config.n_layers)
    train = split_windows(tokenizer, "train", _SEQ_LEN.value, _WINDOWS.value, _SEED.value)
    valid = split_windows(tokenizer, "validation", _SEQ_LEN.value, _EVAL_WINDOWS.value, _SEED.value)
    sparse = [LeMoConfig(keep_ratio=float(k), selector="attention_ratio", mlp_mode="dense",
                         keep_first_block=True, block_size=_BLOCK.value) for k in _SPARSE_KEEPS.value]
    settings = {"base": _BASE.value, "seq_len": _SEQ_LEN.value, "seed": _SEED.value,
                "layers": list(layers), "target": _TARGET.value, "block": _BLOCK.value,
                "sparse_keeps": list(_SPARSE_KEEPS.value)}
    train_data = cached("train", {**settings, "windows": _WINDOWS.value},
                        lambda: collect(model, train, layers, sparse, t0))
    corpus = "shakespeare train split"
    if files:
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        extra = extra_windows(tokenizer, files, _SEQ_LEN.value, _EXTRA_WINDOWS.value, _SEED.value)
        extra_data = cached("extra", {**settings, "windows": _EXTRA_WINDOWS.value, "text": digest},
                            lambda: collect(model, extra, layers, sparse, t0))
        train_data = {k: np.concatenate([train_data[k], extra_data[k]], axis=1) for k in train_data}
        corpus += f" + {_EXTRA_WINDOWS.value} windows of {len(files)} extra text files (sha256 {digest})"
    valid_data = cached("validation", {**settings, "windows": _EVAL_WINDOWS.value},
                        lambda: collect(model, valid, layers, sparse, t0))
    params, losses = ls.fit(train_data, target=_TARGET.value, steps=_STEPS.value,
                            batch=_BATCH.value, lr=_LR.value, weight_decay=_WEIGHT_DECAY.value,
                            seed=_SEED.value, hidden=_HIDDEN.value,
                            loss=_LOSS.value, window=_SEQ_LEN.value, block_size=_BLOCK.value,
                            log_every=max(_STEPS.value // 10, 1))
    quality = held_out_quality(params, valid_data)
    english = {}
    if _ENGLISH.value:
        windows = heldout.english_windows(tokenizer, _SEQ_LEN.value, _ENGLISH.value)
        english_data = cached("english", {**settings, "windows": _ENGLISH.value},
                              lambda: collect(model, windows, layers, sparse, t0))
        english = {"validation_english": {"windows": _ENGLISH.value, "source": heldout.SOURCE,
                                          **held_out_quality(params, english_data)}}
    info = {"base": _BASE.value, "corpus": corpus, "windows": _WINDOWS.value,
            "seq_len": _SEQ_LEN.value, "steps": _STEPS.value, "batch": _BATCH.value,
            "hidden": _HIDDEN.value, "loss": _LOSS.value, "weights_dtype": _DTYPE.value,
            "lr": _LR.value, "weight_decay": _WEIGHT_DECAY.value, "seed": _SEED.value,
            "final_loss": losses[-1],
            "sparse_keeps": [float(k) for k in _SPARSE_KEEPS.value], "target": _TARGET.value,
            "selector_in_collection": "attention_ratio",
            "validation": {"windows": _EVAL_WINDOWS.value, "block_size": _BLOCK.value, **quality},
            **english}
    selector = ls.LearnedSelector(config.n_layers, config.d_model, layers=layers,
                                  hidden=_HIDDEN.value, target=_TARGET.value, info=info)
    selector.set_params(ls.stacked(params, layers, config.n_layers))
    ls.save(selector, _OUT.value, dtype=np.dtype(_DTYPE.value))
    print(f"wrote {_OUT.value}: validation {quality} {english} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    app.run(main)
