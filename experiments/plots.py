"""Figures of the benchmark results: one pure function per figure, JSON result in, PNG out.

    python -m experiments.plots [bench_results/ | FILE.json ...]   # redraw every PNG, rerun nothing
    python -m experiments.plots RUN_DIR                           # a training run's curves

A directory holding a ``metrics.jsonl`` is a training run (a pretrain / finetune ``--workdir``): its
curves (training and validation loss, learning rate, tokens/s and gradient norm vs step) are drawn
into ``RUN_DIR/curves.png`` (:func:`run_curves`).

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
- ``lemo_scale``: LoRA / row ratios of compiled FLOPs, activation and total memory vs sequence
  length for every LeMo row, with the analytic ceiling; the goal row's FLOPs by category.
- ``analyze_sparsity``: per-layer sparsity and block-overlap curves and, when the rows carry
  ``keep_blocks``, each layer's kept blocks (the top 40%) for the first window of each length.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np

GIB = 2**30
METHOD_COLORS = {"lora": "tab:blue", "lemo": "tab:orange", "dense": "tab:blue", "subllm": "tab:green",
                 "lemo_elimination": "tab:red", "lemo_mlp": "tab:purple"}
METHOD_LABELS = {"lora": "LoRA", "lemo": "LeMo", "lemo_elimination": "LeMo, elimination alone",
                 "lemo_mlp": "LeMo, MLP treatment alone"}
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
    """Activation (temp) and total memory of one LoRA step vs T: the fair LoRA baseline and LeMo's
    rows (elimination alone, MLP treatment alone, both) per remat policy."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (("temp_bytes", "activations + workspace (temp)"), ("total", "total (temp + arguments)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for remat in dict.fromkeys(r["remat"] for r in rows):
            for method in METHOD_LABELS:
                pts = sorted((r["seq_len"], (r["temp_bytes"] + r["arg_bytes"] if key == "total"
                                             else r["temp_bytes"]) / GIB)
                             for r in rows if r["method"] == method and r["remat"] == remat)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=METHOD_COLORS[method],
                            linestyle=REMAT_STYLES.get(remat, "-"),
                            label=f"{METHOD_LABELS[method]}, remat {remat}")
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
    panels = [panel for panel in (("train_tokens_per_s", "training tokens/s", 1.0),
                                  ("decode_token_s", "decode ms per token", 1e3))
              if any(r.get(panel[0]) for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5 * len(panels), 8.5), 4.2),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
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
    for ax, (key, _, _) in zip(axes, panels, strict=True):
        name = "train_throughput_ratio" if key == "train_tokens_per_s" else "decode_speedup"
        ratios = ", ".join(f"{t}: {result['summary'][f'{name}@{t}']:.2f}x"
                           for t in lengths if f"{name}@{t}" in result["summary"])
        ax.legend(fontsize=8, title=f"{name.replace('_', ' ')} {ratios}", title_fontsize=8)
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


def lemo_selection(result: dict, png: pathlib.Path) -> bool:
    """Zero-step loss of the LeMo sparse forward vs keep ratio, one line per selection rule; one
    panel per text set and length, the dense loss dashed."""
    rows = [r for r in result["rows"] if r.get("kind") == "loss"]
    if not rows:
        return False
    plt = _pyplot()
    sets = [s for s in ("shakespeare", "english") if any(f"loss_{s}" in r for r in rows)]
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(len(sets), len(lengths), figsize=(5.5 * len(lengths), 4 * len(sets)),
                             constrained_layout=True, squeeze=False)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for i, name in enumerate(sets):
        for j, seq_len in enumerate(lengths):
            ax = axes[i][j]
            for k, rule in enumerate(rules):  # one colour per rule across panels
                pts = sorted((r["keep"], r[f"loss_{name}"]) for r in rows
                             if r["rule"] == rule and r["seq_len"] == seq_len)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=rule, color=f"C{k % 10}")
            dense = [r[f"loss_{name}"] for r in result["rows"]
                     if r.get("kind") == "dense" and r["seq_len"] == seq_len]
            if dense:
                ax.axhline(dense[0], color="k", linestyle="--", linewidth=0.8, label="dense")
            ax.set_title(f"{name}, T={seq_len}", fontsize=10)
            ax.set_xlabel("keep ratio (half schedule)")
            ax.set_ylabel("loss (nats)")
            ax.grid(alpha=0.3)
            if i == j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"LeMo selection rules, zero-step loss of {result.get('settings', {}).get('model', '')} "
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


PRESET_MARKERS = ("o", "s", "^", "D")
CATEGORY_COLORS = {"projections": "tab:blue", "attention": "tab:orange", "mlp": "tab:green",
                   "selection": "tab:red", "head": "tab:purple", "other": "tab:gray"}


def lemo_scale(result: dict, png: pathlib.Path) -> bool:
    """LoRA / row ratios of compiled FLOPs, activation and total memory vs T for every LeMo row,
    preset and remat policy (the analytic ceiling dotted), and the goal row's FLOPs by category."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["method"] != "lora"]
    if not rows:
        return False
    lengths = sorted({r["seq_len"] for r in rows})
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(12, 10), layout="constrained")
    panels = (("flops_ratio", "compiled FLOPs, LoRA / row"),
              ("activation_ratio", "activations (temp), LoRA / row"),
              ("total_ratio", "total memory (temp + args), LoRA / row"))
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for name, marker in zip(presets, PRESET_MARKERS, strict=False):
            for remat in dict.fromkeys(r["remat"] for r in rows):
                for method in dict.fromkeys(r["method"] for r in rows):
                    pts = sorted((r["seq_len"], r[key]) for r in rows
                                 if (r["preset"], r["remat"], r["method"]) == (name, remat, method))
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker=marker,
                                color=METHOD_COLORS.get(method, "tab:gray"),
                                linestyle=REMAT_STYLES.get(remat, "-"),
                                label=f"{METHOD_LABELS.get(method, method)}, {name}, remat {remat}")
        if key == "flops_ratio":
            goal = result.get("settings", {}).get("goal_row", {})
            for summary_key, color, what in (
                    ("analytic_ceiling", "k", "analytic ceiling (free selection), every tile"),
                    ("analytic_ceiling_causal", "tab:gray", "analytic ceiling, causal half"),
                    ("flops_ratio_causal", "tab:red", "goal row, skipped causal tiles at half")):
                pts = sorted((t, result["summary"][f"{summary_key}@{t}"]) for t in lengths
                             if f"{summary_key}@{t}" in result["summary"])
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=color, linestyle=":", marker="x",
                            label=f"{what}, {goal.get('preset', '')}")
        _log2_lengths(ax, lengths)
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=7)
    _flops_breakdown(axes[1, 1], result)
    fig.suptitle(f"LeMo vs fair LoRA at scale, compile-only ({_provenance(result)})", fontsize=10)
    _save(fig, png)
    return True


def _flops_breakdown(ax, result: dict) -> None:
    """Stacked FLOPs by category of the goal row and its LoRA baseline at each length, in units of
    the baseline's total."""
    goal = result.get("settings", {}).get("goal_row", {})
    mine = [r for r in result["rows"] if r["preset"] == goal.get("preset")
            and r["remat"] == goal.get("remat") and r["method"] in ("lora", goal.get("method"))]
    lengths = sorted({r["seq_len"] for r in mine})
    for i, t in enumerate(lengths):
        at = {r["method"]: r for r in mine if r["seq_len"] == t}
        for j, method in enumerate(("lora", goal.get("method"))):
            if method not in at or "lora" not in at:
                continue
            bottom = 0.0
            for category, flops in at[method]["flops_by_category"].items():
                share = flops / at["lora"]["flops"]
                ax.bar(i + (j - 0.5) * 0.4, share, width=0.38, bottom=bottom,
                       color=CATEGORY_COLORS.get(category, "tab:gray"),
                       label=category if i == 0 and j == 0 else None)
                bottom += share
    ax.set_xticks(range(len(lengths)), [f"{f'{t // 1024}K' if t >= 1024 else t}\nLoRA | LeMo"
                                        for t in lengths], fontsize=8)
    ax.set_ylabel("FLOPs / LoRA's")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"where the FLOPs go: {goal.get('preset', '')}, {goal.get('method', '')}, remat "
                 f"{goal.get('remat', '')}", fontsize=9)
    if mine:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, axis="y")


FIGURES: dict[str, Callable[[dict, pathlib.Path], bool]] = {
    "lemo_memory": lemo_memory, "subllm_speed": subllm_speed, "lemo_quality": loss_curves,
    "subllm_quality": loss_curves, "lemo_predictor": lemo_predictor,
    "analyze_sparsity": analyze_sparsity, "lemo_selection": lemo_selection, "lemo_scale": lemo_scale,
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


def read_run(run_dir: str | pathlib.Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in step order (a line cut by a kill is skipped)."""
    records = []
    for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def run_curves(records: list[dict], png: pathlib.Path, title: str = "") -> bool:
    """A training run's curves vs step: training loss with the validation loss, learning rate,
    tokens/s (steady steps; compile time excluded) and gradient norm. False when nothing to draw."""
    plt = _pyplot()
    panels = [(("loss", "val_loss"), "loss (nats/token)"), (("lr",), "learning rate"),
              (("tokens_per_s",), "training tokens/s"), (("grad_norm",), "gradient norm")]
    if not any(k in r for r in records for keys, _ in panels for k in keys):
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (keys, name) in zip(axes.flat, panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if key.startswith("val_") else None,
                        markersize=4, label={"loss": "train", "val_loss": "validation"}.get(key, key))
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    compile_s = next((r["compile_s"] for r in records if "compile_s" in r), None)
    note = f", first step (compile) {compile_s:.1f}s" if compile_s is not None else ""
    fig.suptitle(f"{title}{note}", fontsize=10)
    _save(fig, png)
    return True


def plot_run(run_dir: str | pathlib.Path) -> str:
    """Draw ``run_dir``'s curves into ``run_dir/curves.png``; one line saying what happened."""
    run_dir = pathlib.Path(run_dir)
    png = run_dir / "curves.png"
    if _pyplot() is None:
        return f"skipped {png}: matplotlib is not installed (pip install 'tokensparse[plots]')"
    if not run_curves(read_run(run_dir), png, title=f"{run_dir.resolve().name}"):
        return f"skipped {png}: {run_dir / 'metrics.jsonl'} has no records to draw"
    return f"wrote {png}"


def main(argv) -> None:
    paths = [pathlib.Path(p) for p in argv[1:]] or [pathlib.Path("bench_results")]
    runs = [p for p in paths if p.is_dir() and (p / "metrics.jsonl").is_file()]
    for run in runs:
        print(plot_run(run))
    files = [f for p in paths if p not in runs
             for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    if not files and not runs:
        raise SystemExit(f"no JSON results or training runs (metrics.jsonl) in "
                         f"{', '.join(map(str, paths))}")
    for f in files:
        print(plot_file(f))


if __name__ == "__main__":
    from experiments import _checks

    _checks.run(main)
