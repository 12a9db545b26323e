"""Token windows and layer lists for the selector experiments (``experiments.train_selector``,
``experiments.bench.lemo_window_agreement``): flag-free, so either can import them."""

from __future__ import annotations

import numpy as np
from absl import app

from tokensparse import data


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
    """``--layers``: all, a range a-b (inclusive) or a comma list of indices, checked against
    ``n_layers``."""
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
