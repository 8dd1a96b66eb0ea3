"""The report's per-run diagnostics: weight drift per block and robustness to corrupted inputs.

Drawn from the train stage's per-seed metrics.json (`weight_drift`, `robustness`) and
history.csv (`drift_<block>` per epoch) of every strategy (and, for drift, every depth of the
depth study).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.plotting import plt
from pipeline.core.stats import t_interval
from pipeline.core.vgg16 import BLOCKS


def mean_ci(values: list[float]) -> str:
    """'0.812 ± 0.034' (mean ± half-width of the 95% t-interval), or the mean alone for one value."""
    interval = t_interval(values)
    if interval.low is None:
        return f"{interval.mean:.3f}"
    return f"{interval.mean:.3f} ± {interval.high - interval.mean:.3f}"


# --- weight drift -----------------------------------------------------------------------------


def mean_drift(result: dict) -> dict[str, float]:
    """Final ||W - W0|| / ||W0|| per block, mean over seeds."""
    per_seed = list(result["weight_drift"].values())
    return {block: float(np.mean([d[block] for d in per_seed])) for block in BLOCKS}


def drift_text(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def drift_heatmap(rows: dict[str, dict[str, float]], title: str, row_label: str) -> plt.Figure:
    """Rows (strategies or depths) x blocks, colour = drift, the value printed (exact 0 as 0)."""
    names = list(rows)
    values = np.array([[rows[name][block] for block in BLOCKS] for name in names])
    figure, axes = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.8))
    image = axes.imshow(values, cmap="Oranges", aspect="auto", vmin=0, vmax=values.max() if values.any() else 1.0)
    axes.set_xticks(range(len(BLOCKS)), list(BLOCKS))
    axes.set_yticks(range(len(names)), names)
    axes.set_ylabel(row_label)
    top = values.max() if values.size else 0
    for (row, col), value in np.ndenumerate(values):
        axes.text(
            col,
            row,
            drift_text(value),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if top and value > 0.6 * top else "black",
        )
    figure.colorbar(image, ax=axes, label="||W − W0|| / ||W0||")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def drift_curves(results: dict, palette: dict) -> plt.Figure:
    """Per strategy that fine-tunes conv layers: drift per block per epoch, mean over seeds."""
    tuned = {v: r for v, r in results.items() if any(mean_drift(r).values())}
    columns = min(3, max(1, len(tuned)))
    rows_n = -(-max(1, len(tuned)) // columns)
    figure, grid = plt.subplots(rows_n, columns, figsize=(4.3 * columns, 3.3 * rows_n), squeeze=False)
    for axes in list(grid.flat)[len(tuned) :]:
        axes.set_visible(False)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(BLOCKS)))
    for axes, (variant, result) in zip(grid.flat, tuned.items(), strict=False):
        histories = list(result["histories"].values())
        epochs = min(len(h) for h in histories)
        for colour, block in zip(colours, BLOCKS, strict=True):
            values = np.mean([[h[i].get(f"drift_{block}", 0.0) for i in range(epochs)] for h in histories], axis=0)
            if np.any(values):
                axes.plot(range(1, epochs + 1), values, marker="o", markersize=3, color=colour, label=block)
        axes.set_title(variant, color=palette[variant])
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    for axes in grid[:, 0]:
        axes.set_ylabel("||W − W0|| / ||W0||")
    figure.suptitle("Weight drift per block during training (mean over seeds; frozen blocks stay at 0)")
    figure.tight_layout()
    return figure


# --- robustness -------------------------------------------------------------------------------


def robustness_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    robust = {v: r["robustness"] for v, r in results.items() if r.get("robustness")}
    if not robust:
        return None
    kinds = list(next(iter(next(iter(robust.values())).values()))["accuracy"])
    severity = next(iter(next(iter(robust.values())).values()))["severity"]
    headers = ["strategy", "clean", *[f"{k} (severity {severity})" for k in kinds], "mean drop (± 95% CI)"]
    rows = []
    for variant, per_seed in robust.items():
        seeds = list(per_seed.values())
        rows.append(
            [
                f"**{variant}**",
                mean_ci([s["clean_accuracy"] for s in seeds]),
                *[mean_ci([s["accuracy"][k] for s in seeds]) for k in kinds],
                mean_ci([s["mean_drop"] for s in seeds]),
            ]
        )
    return headers, rows


def robustness_figure(results: dict, palette: dict) -> plt.Figure:
    robust = {v: r["robustness"] for v, r in results.items() if r.get("robustness")}
    kinds = ["clean", *next(iter(next(iter(robust.values())).values()))["accuracy"]]
    figure, axes = plt.subplots(figsize=(max(7, 1.6 * len(kinds) * len(robust) / 3), 4.5))
    width = 0.8 / len(robust)
    for i, (variant, per_seed) in enumerate(robust.items()):
        seeds = list(per_seed.values())
        means = [np.mean([s["clean_accuracy"] if k == "clean" else s["accuracy"][k] for s in seeds]) for k in kinds]
        axes.bar(np.arange(len(kinds)) + i * width, means, width, color=palette[variant], label=variant)
    axes.set_xticks(np.arange(len(kinds)) + width * (len(robust) - 1) / 2, kinds)
    axes.set_ylabel("test accuracy (mean over seeds)")
    axes.set_ylim(0, 1)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(title="strategy", fontsize=8)
    axes.set_title("Robustness: accuracy on clean and corrupted copies of the test set")
    figure.tight_layout()
    return figure


def draw(results: dict, palette: dict) -> dict:
    """{figure id: drawing function} for the diagnostics whose data exist."""
    drawings = {}
    if any(r.get("weight_drift") for r in results.values()):
        drawings["weight_drift"] = lambda: drift_heatmap(
            {v: mean_drift(r) for v, r in results.items()}, "Final weight drift per block (mean over seeds)", "strategy"
        )
        if any(any(mean_drift(r).values()) for r in results.values()):
            drawings["weight_drift_epochs"] = lambda: drift_curves(results, palette)
    if any(r.get("robustness") for r in results.values()):
        drawings["robustness"] = lambda: robustness_figure(results, palette)
    return drawings


def blocks(params, results: dict, files: dict) -> list[tuple]:
    doc: list[tuple] = []
    if "weight_drift" in files:
        doc += [
            ("h2", "Weight drift"),
            (
                "p",
                "How far training moved each block of the conv base: ‖W − W₀‖ / ‖W₀‖ of the block's kernels and "
                "biases, W₀ the weights before the first step (pretrained, or the random initialisation for "
                "scratch), at the kept (best validation) epoch. Frozen blocks are exactly 0 (measured, not "
                "assumed). Per-epoch values are in each run's history.csv and MLflow (`drift_<block>`).",
            ),
            ("figure", files["weight_drift"], "Final drift per strategy and block (mean over seeds)."),
        ]
        if "weight_drift_epochs" in files:
            doc.append(("figure", files["weight_drift_epochs"], "Drift per epoch of the blocks that train."))
    table = robustness_table(results)
    if table is not None:
        robust = params.studies.robustness
        doc += [
            ("h2", "Robustness to corrupted inputs"),
            (
                "p",
                f"Every trained model evaluated on corrupted copies of the test set ({', '.join(robust.corruptions)}"
                f" at severity {robust.severity} of 5, noise seeded {robust.seed}: the same images for every "
                "strategy). Accuracy mean ± 95% CI over seeds; the drop is clean minus corrupted accuracy.",
            ),
            ("table", *table),
            ("figure", files["robustness"], "Clean and corrupted test accuracy per strategy."),
        ]
    return doc
