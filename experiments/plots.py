"""Figures of the benchmark results: one pure function per figure, JSON result in, PNG out.

    python -m experiments.plots [bench_results/ | FILE.json ...]   # redraw every PNG, rerun nothing

Each benchmark also draws its own figure when it writes its JSON (``write_result``), beside it as
``<out>.png``. matplotlib is optional (``pip install 'tokensparse[plots]'``) and imported only here,
lazily, with the Agg backend (no display): without it a figure is skipped with a one-line notice,
and neither the library nor the benchmarks need it.

Figures, by the JSON's ``benchmark`` key:

- ``lemo_memory``: compile-only activation (temp) bytes and total bytes vs sequence length, dense
  LoRA vs LeMo, one line per remat policy.
- ``subllm_speed``: training tokens/s and decode time per token vs sequence length, SUBLLM vs its
  dense twin.
- ``lemo_quality``, ``subllm_quality``: training loss per logged step of every compared run, from
  the rows' ``loss_history`` (results written before the benchmarks recorded it have none, and get
  no figure).
- ``lemo_predictor``: per-layer held-out recall@0.4 and Spearman of the predictors, sparse layers
  marked.
- ``analyze_sparsity``: per-layer sparsity and block-overlap curves and, when the rows carry
  ``keep_blocks``, each layer's kept blocks (the top 40%) for the first window of each length.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np

GIB = 2**30
METHOD_COLORS = {"lora": "tab:blue", "lemo": "tab:orange", "dense": "tab:blue", "subllm": "tab:green"}
EXTRA_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")  # ablation runs
REMAT_STYLES = {"none": "-", "full": "--", "dots": ":", "names": "-.", "offload": (0, (1, 3))}


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _provenance(result: dict) -> str:
    return f"{result.get('device', '?')}, git {result.get('git', '?')}"


def _save(fig, png: pathlib.Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    _pyplot().close(fig)


def _log2_lengths(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{t // 1024}K" if t >= 1024 else str(t) for t in lengths])
    ax.minorticks_off()


def lemo_memory(result: dict, png: pathlib.Path) -> bool:
    """Activation (temp) and total memory of one LoRA step vs T: LoRA vs LeMo per remat policy."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (("temp_bytes", "activations + workspace (temp)"), ("total", "total (temp + arguments)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for remat in dict.fromkeys(r["remat"] for r in rows):
            for method in ("lora", "lemo"):
                pts = sorted((r["seq_len"], (r["temp_bytes"] + r["arg_bytes"] if key == "total"
                                             else r["temp_bytes"]) / GIB)
                             for r in rows if r["method"] == method and r["remat"] == remat)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=METHOD_COLORS[method],
                            linestyle=REMAT_STYLES.get(remat, "-"),
                            label=f"{'LoRA' if method == 'lora' else 'LeMo'}, remat {remat}")
        _log2_lengths(ax, lengths)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("GiB")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    preset = rows[0].get("preset", "")
    fig.suptitle(f"LeMo vs dense LoRA: compiled memory of one LoRA step, {preset} "
                 f"({_provenance(result)}, compile-only)", fontsize=10)
    _save(fig, png)
    return True


def subllm_speed(result: dict, png: pathlib.Path) -> bool:
    """Training throughput and decode latency vs T: SUBLLM vs its dense twin."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["seq_len"] for r in rows})
    decode = any(r.get("decode_token_s") for r in rows)
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(11 if decode else 6, 4.2),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
    panels = [("train_tokens_per_s", "training tokens/s", 1.0)]
    if decode:
        panels.append(("decode_token_s", "decode ms per token", 1e3))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for model in ("dense", "subllm"):
            pts = sorted((r["seq_len"], r[key] * scale) for r in rows
                         if r["model"] == model and r.get(key))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=METHOD_COLORS[model],
                        label="dense twin" if model == "dense" else "SUBLLM")
        _log2_lengths(ax, lengths)
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ratios = ", ".join(f"{t}: {result['summary'][f'train_throughput_ratio@{t}']:.2f}x"
                       for t in lengths if f"train_throughput_ratio@{t}" in result["summary"])
    axes[0].legend(fontsize=8, title=f"throughput ratio {ratios}", title_fontsize=8)
    fig.suptitle(f"SUBLLM vs dense twin, {rows[0].get('preset', '')}, batch "
                 f"{rows[0].get('batch_size', '?')}, {rows[0].get('dtype', '')} "
                 f"({_provenance(result)}; on a CPU read the ratios)", fontsize=10)
    _save(fig, png)
    return True


def _run_label(row: dict) -> str:
    if "model" in row and row.get("model"):
        return "dense twin" if row["model"] == "dense" else "SUBLLM"
    label = {"lora": "LoRA", "lemo": "LeMo"}.get(row.get("method"), str(row.get("method")))
    if row.get("method") == "lemo":
        label += (", MLP recomputed" if row.get("mlp_mode") == "recompute"
                  else f", mlp_drop {row.get('mlp_drop')}")
        if row.get("selector") == "predictor":
            label += ", predictors"
    return label


def loss_curves(result: dict, png: pathlib.Path) -> bool:
    """Training loss per logged step of every run with a ``loss_history`` (False: none has one)."""
    runs = [r for r in result["rows"] if r.get("loss_history")]
    if not runs:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    extra = iter(EXTRA_COLORS)
    for row in runs:
        history = row["loss_history"]
        ablation = row.get("method") == "lemo" and (row.get("mlp_drop") != 0.8
                                                    or row.get("selector") == "predictor")
        color = next(extra) if ablation else METHOD_COLORS.get(row.get("model") or row.get("method"))
        ax.plot(history["step"], history["loss"], marker=".", color=color, label=_run_label(row))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = result.get("settings", {})
    what = ("LoRA fine-tuning at T=" + str(s.get("seq_len")) if result["benchmark"] == "lemo_quality"
            else f"pretraining from scratch, T={s.get('seq_len')}, batch {s.get('batch_size')}")
    ax.set_title(f"{result['benchmark']}: {what} ({_provenance(result)})", fontsize=10)
    _save(fig, png)
    return True


def lemo_predictor(result: dict, png: pathlib.Path) -> bool:
    """Per-layer held-out recall@0.4 and Spearman of the trained predictors."""
    layers = sorted((r for r in result["rows"] if r.get("kind") == "layer"), key=lambda r: r["layer"])
    if not layers:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    x = [r["layer"] for r in layers]
    for sparse, color in ((True, "tab:orange"), (False, "tab:gray")):
        mine = [r for r in layers if r["sparse"] == sparse]
        if mine:
            ax.bar([r["layer"] - 0.2 for r in mine], [r["recall@0.4"] for r in mine], width=0.4,
                   color=color, label=f"recall@0.4, {'sparse' if sparse else 'dense'} layer")
    ax.bar([i + 0.2 for i in x], [r["spearman"] for r in layers], width=0.4, color="tab:blue",
           alpha=0.6, label="Spearman with the oracle")
    ax.axhline(0.4, color="k", linewidth=0.8, linestyle=":", label="recall of a random choice")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    s = result.get("settings", {})
    ax.set_title(f"LeMo predictors, {s.get('base') or s.get('preset', '')} at T={s.get('seq_len')}, held-out "
                 f"({_provenance(result)})", fontsize=10)
    _save(fig, png)
    return True


SPARSITY_KEYS = ("block_min_over_max", "score_sparsity", "score_sparsity_nosink", "softmax_sparsity",
                 "cross_input_jaccard", "adjacent_layer_jaccard")


def analyze_sparsity(result: dict, png: pathlib.Path) -> bool:
    """Per-layer sparsity curves per window length; below them, each layer's kept blocks."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["seq_len"] for r in rows})
    keeps = {t: [r for r in rows if r["seq_len"] == t and r.get("keep_blocks")] for t in lengths}
    keeps = {t: k for t, k in keeps.items() if k}
    fig = plt.figure(figsize=(13, 7 + 3 * bool(keeps)), constrained_layout=True)
    grid = fig.add_gridspec(3 if keeps else 2, max(3, len(keeps)))
    for i, key in enumerate(SPARSITY_KEYS):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        for seq_len in lengths:
            pts = [(r["layer"], r[key]) for r in rows if r["seq_len"] == seq_len and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=f"T={seq_len}")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    for j, (seq_len, layer_rows) in enumerate(keeps.items()):
        n_blocks = seq_len // result.get("settings", {}).get("block_size", 64)
        image = np.zeros((len(layer_rows), n_blocks))
        for r in layer_rows:
            image[r["layer"], r["keep_blocks"][0]] = 1.0
        ax = fig.add_subplot(grid[2, j])
        ax.imshow(image, aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_title(f"kept blocks (top 40%), T={seq_len}, first window", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("layer")
    fig.suptitle(f"Attention sparsity of {result.get('settings', {}).get('model', '')} on held-out text "
                 f"({_provenance(result)})", fontsize=10)
    _save(fig, png)
    return True


FIGURES: dict[str, Callable[[dict, pathlib.Path], bool]] = {
    "lemo_memory": lemo_memory, "subllm_speed": subllm_speed, "lemo_quality": loss_curves,
    "subllm_quality": loss_curves, "lemo_predictor": lemo_predictor,
    "analyze_sparsity": analyze_sparsity,
}


def plot(result: dict, png: str | pathlib.Path) -> str:
    """Draw ``result``'s figure into ``png``; returns one line saying what happened."""
    png = pathlib.Path(png)
    figure = FIGURES.get(result.get("benchmark"))
    if figure is None:
        return f"no figure for benchmark {result.get('benchmark')!r}"
    if _pyplot() is None:
        return f"skipped {png}: matplotlib is not installed (pip install 'tokensparse[plots]')"
    if not figure(result, png):
        why = ("no row has a loss_history (results written before the benchmark recorded it; "
               "rerun it for the curves)" if figure is loss_curves else "no rows to draw")
        return f"skipped {png}: {why}"
    return f"wrote {png}"


def plot_file(path: str | pathlib.Path) -> str:
    path = pathlib.Path(path)
    return plot(json.loads(path.read_text()), path.with_suffix(".png"))


def main(argv) -> None:
    paths = [pathlib.Path(p) for p in argv[1:]] or [pathlib.Path("bench_results")]
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    if not files:
        raise SystemExit(f"no JSON results in {', '.join(map(str, paths))}")
    for f in files:
        print(plot_file(f))


if __name__ == "__main__":
    from experiments import _checks

    _checks.run(main)
