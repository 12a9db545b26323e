"""LeMo's premise measured on a real pretrained model: how sparse, and how contextual, is attention?

    python -m experiments.analyze_sparsity --out bench_results/analyze_sparsity.json \\
        [--model=smollm2-135m --seq_lens=1024,2048,4096,8192 --windows=2,3,1,1 --rows=256]

Windows of T tokens come from the held-out Shakespeare works (validation + test splits, each window
from the middle of a different work where possible), tokenised with the model's own tokenizer. For
every layer of every window the dense forward is run once and, from that layer's input:

- ``block_sparsity``: the fraction of 64-token key blocks whose oracle block score
  (:func:`tokensparse.lemo.scoring.block_scores`, the library's default target kernel on pre-RoPE
  q, k) is below ``block_threshold`` (10%) of the layer's largest block score;
  ``block_min_over_max`` is the smallest block score over the largest.
- ``score_sparsity`` (the paper's sparsity ratio): the fraction of causal attention entries below
  ``score_threshold`` (0.3) times their row's maximum, where an entry is LeMo's informativeness
  ``A_ij = sum_h ReLU(q_ih . k_jh)`` (pre-RoPE, as the oracle). ``softmax_sparsity`` is the same
  fraction over the softmax probabilities (post-RoPE, 1/sqrt(d), per head), which is far higher
  because softmax is peaked. ``score_sparsity_nosink`` leaves key 0 (the attention sink, which
  dominates many rows) out of both the maximum and the count. All are estimated on ``--rows`` query
  rows spread evenly over the window (entry-weighted, so they estimate the whole causal matrix).
- the top-40% block set (``keep``); ``cross_input_jaccard`` is its mean pairwise Jaccard overlap
  between different windows at the same layer, ``adjacent_layer_jaccard`` between layers l and l+1 of
  the same window. Two random 40% subsets overlap by ``random_jaccard`` (about 0.25) on average.

Writes the JSON (per-layer ``rows`` and a ``summary`` with ``block_sparsity@<T>``,
``score_sparsity@<T>``, ``softmax_sparsity@<T>``, ``cross_input_jaccard@<T>``,
``adjacent_layer_jaccard@<T>``; rows also list each window's kept blocks, ``keep_blocks``) and,
when matplotlib is installed (``pip install tokensparse[plots]``), a PNG next to it: the per-layer
curves and the first window's kept blocks per layer (:func:`experiments.plots.analyze_sparsity`).
"""

from __future__ import annotations

import pathlib
import time

from absl import app, flags

from experiments import _checks
from experiments.bench import write_result
from tokensparse import zoo
from tokensparse.lemo.analysis import BLOCK, BLOCK_THRESHOLD, KEEP, SCORE_THRESHOLD, analyze, held_out_windows

_OUT = flags.DEFINE_string("out", "bench_results/analyze_sparsity.json", "Where to write the JSON.")
_PNG = flags.DEFINE_string("png", None, "Where to write the plots (default: --out with .png).")
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A tokensparse.zoo model name.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192"], "Window lengths T.")
_WINDOWS = flags.DEFINE_list("windows", ["2", "3", "1", "1"], "Windows per length (same order).")
_ROWS = flags.DEFINE_integer("rows", 256, "Query rows sampled per window for the score sparsities.")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend of the forward.")

_checks.int_list(_SEQ_LENS, minimum=BLOCK, multiple_of=BLOCK, why="whole key blocks")
_checks.int_list(_WINDOWS)
_checks.same_length(_SEQ_LENS, _WINDOWS)
_checks.at_least(_ROWS, 1)
_checks.one_of(_MODEL, sorted(zoo.MODELS))
_checks.one_of(_ATTENTION, _checks.attention_backends())


def main(argv):
    del argv
    t0 = time.perf_counter()
    seq_lens = [int(s) for s in _SEQ_LENS.value]
    counts = [int(c) for c in _WINDOWS.value]
    model, config, tokenizer = zoo.load(_MODEL.value, attention_backend=_ATTENTION.value)
    if max(seq_lens) > config.max_positions:
        raise app.UsageError(f"--seq_lens exceeds the model's context ({config.max_positions}).")
    windows = held_out_windows(tokenizer, seq_lens, counts)
    rows, summary = analyze(model, windows, _ROWS.value)
    summary["seconds"] = time.perf_counter() - t0
    out = pathlib.Path(_OUT.value)
    settings = {"model": _MODEL.value, "seq_lens": seq_lens, "windows": counts, "rows": _ROWS.value,
                "block_size": BLOCK, "keep": KEEP, "block_threshold": BLOCK_THRESHOLD,
                "score_threshold": SCORE_THRESHOLD, "score_options": "target kernel, pre-RoPE",
                "corpus": "shakespeare validation+test", "attention": _ATTENTION.value}
    write_result(out, "analyze_sparsity", rows, summary, settings=settings, png=_PNG.value or None)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4g}")


if __name__ == "__main__":
    _checks.run(main)
