"""The report's figures, drawn from result tables (pandas-free: plain dicts and arrays).

Every function takes the gathered results, returns a matplotlib Figure, and uses one colour
per strategy (`colours`) so a strategy looks the same in every figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.figures import plt
from pipeline.stats import t_interval


def colours(variants: list[str]) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def _curves(histories: dict[int, list[dict]], x_key: str, y_key: str):
    """Mean x, mean y, min y, max y per epoch over seeds (epochs common to all seeds)."""
    epochs = min(len(rows) for rows in histories.values())
    x = np.array([[rows[i][x_key] for i in range(epochs)] for rows in histories.values()], dtype=float)
    y = np.array([[rows[i][y_key] for i in range(epochs)] for rows in histories.values()], dtype=float)
    return x.mean(axis=0), y.mean(axis=0), y.min(axis=0), y.max(axis=0)


def convergence(results: dict, palette: dict, x_key: str, x_label: str) -> plt.Figure:
    """Validation accuracy and loss against `x_key` (epoch or cumulative_seconds): mean over
    seeds, band = min..max over seeds."""
    figure, (acc_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, result in results.items():
        for axes, key in ((acc_axes, "val_accuracy"), (loss_axes, "val_loss")):
            x, mean, low, high = _curves(result["histories"], x_key, key)
            axes.plot(x, mean, marker="o", markersize=3, color=palette[variant], label=variant)
            axes.fill_between(x, low, high, color=palette[variant], alpha=0.15)
            warmup = result.get("warmup_epochs", 0)
            if warmup and x_key == "epoch":  # two-phase strategy: where fine-tuning starts
                axes.axvline(warmup + 0.5, color=palette[variant], linestyle="--", alpha=0.7)
                axes.annotate(f"{variant}: warm-up ends", (warmup + 0.5, 0.02), xycoords=("data", "axes fraction"),
                              rotation=90, fontsize=7, color=palette[variant], ha="right", va="bottom")  # fmt: skip
    acc_axes.set_ylabel("validation accuracy")
    loss_axes.set_ylabel("validation loss (cross-entropy)")
    for axes in (acc_axes, loss_axes):
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
        if x_key == "epoch":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_axes.legend(title="strategy")
    seeds = len(next(iter(results.values()))["histories"])
    figure.suptitle(f"Convergence: mean over {seeds} seed(s), band = min..max across seeds")
    figure.tight_layout()
    return figure


def _panels(n: int):
    """A grid of n small panels, 3 per row, sharing the y axis; spare cells hidden."""
    columns = min(n, 3)
    rows = -(-n // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, sharey=True)
    for axes in list(grid.flat)[n:]:
        axes.set_visible(False)
    return figure, grid


def train_vs_val(results: dict, palette: dict) -> plt.Figure:
    """Per strategy: training and validation accuracy per epoch (a gap means over-fitting)."""
    figure, grid = _panels(len(results))
    for axes, (variant, result) in zip(grid.flat, results.items(), strict=False):
        for key, style in (("accuracy", "--"), ("val_accuracy", "-")):
            x, mean, low, high = _curves(result["histories"], "epoch", key)
            label = "training" if key == "accuracy" else "validation"
            axes.plot(x, mean, style, color=palette[variant], label=label)
            axes.fill_between(x, low, high, color=palette[variant], alpha=0.12)
        axes.set_title(variant)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    for axes in grid[:, 0]:
        axes.set_ylabel("accuracy")
    figure.suptitle("Training (dashed) vs validation (solid) accuracy, mean over seeds")
    figure.tight_layout()
    return figure


def test_accuracy(results: dict, palette: dict) -> plt.Figure:
    """Test accuracy per strategy: each seed as a dot, mean with its 95% t-interval."""
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4.5))
    for i, (variant, result) in enumerate(results.items()):
        values = list(result["test_accuracy"].values())
        interval = t_interval(values)
        axes.scatter([i] * len(values), values, color=palette[variant], alpha=0.5, s=18)
        if interval.low is not None:
            axes.errorbar(i, interval.mean, yerr=[[interval.mean - interval.low], [interval.high - interval.mean]],
                          fmt="o", color=palette[variant], capsize=6, markersize=8)  # fmt: skip
        else:
            axes.plot(i, interval.mean, "o", color=palette[variant], markersize=8)
    axes.set_xticks(range(len(results)), list(results))
    axes.set_ylim(0, 1)  # with few seeds a t-interval can pass 0 or 1; accuracy cannot
    axes.set_ylabel("test accuracy")
    axes.set_xlabel("strategy")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title("Test accuracy: seeds (dots), mean and 95% confidence interval")
    figure.tight_layout()
    return figure


def accuracy_vs_trainable(results: dict, palette: dict) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant, result in results.items():
        interval = t_interval(list(result["test_accuracy"].values()))
        trainable = result["parameters"]["trainable"]
        yerr = None if interval.low is None else [[interval.mean - interval.low], [interval.high - interval.mean]]
        axes.errorbar(trainable, interval.mean, yerr=yerr, fmt="o", color=palette[variant], capsize=5, label=variant)
        axes.annotate(variant, (trainable, interval.mean), textcoords="offset points", xytext=(6, 6), fontsize=9)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("test accuracy (mean, 95% CI)")
    axes.grid(alpha=0.3, which="both")
    axes.set_title("Accuracy vs trainable parameters")
    figure.tight_layout()
    return figure


def parameter_counts(results: dict, palette: dict) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4.5))
    names = list(results)
    trainable = np.array([results[v]["parameters"]["trainable"] for v in names]) / 1e6
    frozen = np.array([results[v]["parameters"]["non_trainable"] for v in names]) / 1e6
    axes.bar(names, trainable, color=[palette[v] for v in names], label="trainable")
    axes.bar(names, frozen, bottom=trainable, color="lightgrey", hatch="//", label="non-trainable (frozen)")
    axes.set_ylabel("parameters (millions)")
    axes.set_xlabel("strategy")
    axes.legend()
    axes.set_title("Parameters per strategy: trainable vs frozen")
    figure.tight_layout()
    return figure


def tuning_history(tuning: dict, palette: dict) -> plt.Figure:
    """Per strategy: each trial's value, the best so far, and the chosen hyperparameters."""
    figure, grid = _panels(len(tuning))
    for axes, (variant, tune) in zip(grid.flat, tuning.items(), strict=False):
        trials = tune["trials"]
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        pruned = [t for t in trials if t["state"] == "PRUNED"]
        axes.scatter([t["number"] for t in complete], [t["value"] for t in complete], color=palette[variant],
                     label="complete")  # fmt: skip
        axes.scatter([t["number"] for t in pruned], [t["value"] or 0 for t in pruned], marker="x", color="grey",
                     label="pruned (last value)")  # fmt: skip
        best_so_far = np.maximum.accumulate([t["value"] if t["state"] == "COMPLETE" else -np.inf for t in trials])
        axes.step([t["number"] for t in trials], np.where(np.isfinite(best_so_far), best_so_far, np.nan),
                  where="post", color=palette[variant], alpha=0.6)  # fmt: skip
        best = tune["best"]
        axes.set_title(f"{variant}: units={best['head_units']}, lr={best['learning_rate']:.2g}", fontsize=10)
        axes.set_xlabel("trial")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for axes in grid[:, 0]:
        axes.set_ylabel("best validation accuracy")
    grid.flat[0].legend(fontsize=8)
    figure.suptitle("Tuning history per strategy (line: best so far); title: chosen hyperparameters")
    figure.tight_layout()
    return figure
