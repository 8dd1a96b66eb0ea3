"""The report's figures, drawn from result tables (pandas-free: plain dicts and arrays).

Every function takes the gathered results, returns a matplotlib Figure, and uses one colour
per strategy (`colours`) so a strategy looks the same in every figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.core.plotting import plt


def colours(variants: list[str]) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def _curves(histories: dict[int, list[dict]], x_key: str, y_key: str):
    """Mean x, mean y, min y, max y per epoch over the seeds that trained that epoch (early
    stopping ends seeds at different epochs)."""
    epochs = max(len(rows) for rows in histories.values())

    def per_epoch(key: str) -> list[np.ndarray]:
        return [np.array([rows[i][key] for rows in histories.values() if len(rows) > i]) for i in range(epochs)]

    xs, ys = per_epoch(x_key), per_epoch(y_key)
    return tuple(
        np.array([f(v) for v in series]) for f, series in ((np.mean, xs), (np.mean, ys), (np.min, ys), (np.max, ys))
    )


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
                axes.annotate(
                    f"{variant}: warm-up ends",
                    (warmup + 0.5, 0.02),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=7,
                    color=palette[variant],
                    ha="right",
                    va="bottom",
                )
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


REFERENCE_STYLES = ("--", ":", "-.")


def reference_lines(axes, references: dict[str, float]) -> None:
    """The baselines as horizontal lines on the same accuracy scale."""
    for (name, value), style in zip(references.items(), REFERENCE_STYLES, strict=False):
        axes.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name.replace('_', ' ')} {value:.3f}")


def error_bar(interval) -> list | None:
    return None if interval.low is None else [[interval.mean - interval.low], [interval.high - interval.mean]]


def test_accuracy(results: dict, palette: dict, references: dict[str, float] | None = None) -> plt.Figure:
    """Test accuracy per strategy: each seed as a dot, mean with its 95% interval (seeds and test
    images), the baselines as lines."""
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4.5))
    for i, (variant, result) in enumerate(results.items()):
        values = list(result["test_accuracy"].values())
        interval = result["interval"]
        axes.scatter([i] * len(values), values, color=palette[variant], alpha=0.5, s=18)
        axes.errorbar(
            i, interval.mean, yerr=error_bar(interval), fmt="o", color=palette[variant], capsize=6, markersize=8
        )
    reference_lines(axes, references or {})
    axes.set_xticks(range(len(results)), list(results))
    lows = [r["interval"].low or r["interval"].mean for r in results.values()] + list((references or {}).values())
    axes.set_ylim(max(0.0, min(lows) - 0.1), 1.0)
    axes.set_ylabel("test accuracy")
    axes.set_xlabel("strategy")
    axes.grid(axis="y", alpha=0.3)
    if references:
        axes.legend(fontsize=8, loc="lower right")
    axes.set_title("Test accuracy: seeds (dots), mean and 95% interval (seeds and test images)")
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


def tuning_curves(tuning: dict, palette: dict) -> plt.Figure:
    """Expected best validation accuracy against the number of trials, per strategy (Dodge et al.
    2019), with a one-standard-deviation band; a hollow end marker: still rising at the budget."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for variant, tune in tuning.items():
        curve = tune["best"]["tuning_curve"]
        mean, std = np.asarray(curve["expected_best"]), np.asarray(curve["std"])
        trials = np.arange(1, len(mean) + 1)
        axes.plot(trials, mean, color=palette[variant], label=variant)
        axes.fill_between(trials, mean - std, mean + std, color=palette[variant], alpha=0.12)
        rising = curve["still_rising"]
        axes.scatter(
            [trials[-1]], [mean[-1]], s=50, color=palette[variant], facecolors="white" if rising else palette[variant]
        )
    axes.set_xlabel("trials")
    axes.set_ylabel("expected best validation accuracy")
    axes.set_xticks(np.arange(1, max(len(t["best"]["tuning_curve"]["expected_best"]) for t in tuning.values()) + 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("Tuning curves: expected best of n trials (band: ±1 SD; hollow end: still rising)", fontsize=10)
    figure.tight_layout()
    return figure


def tuning_history(tuning: dict, palette: dict) -> plt.Figure:
    """Per strategy: each trial's value against its learning rate (marker = head size), the
    searched range's ends (dashed) and the chosen trial (ringed): a choice at an end says the
    range was too narrow."""
    units = sorted({int(t["head_units"]) for tune in tuning.values() for t in tune["trials"]})
    markers = {u: "osD^v<>"[i % 7] for i, u in enumerate(units)}
    figure, grid = _panels(len(tuning))
    for axes, (variant, tune) in zip(grid.flat, tuning.items(), strict=False):
        complete = [t for t in tune["trials"] if t["state"] == "COMPLETE"]
        pruned = [t for t in tune["trials"] if t["state"] == "PRUNED" and t["rung_value"] is not None]
        axes.scatter(
            [float(t["learning_rate"]) for t in pruned],
            [t["rung_value"] for t in pruned],
            marker="x",
            color=palette[variant],
            alpha=0.6,
            label="cut at the rung (value there)",
        )
        for units, marker in markers.items():
            chosen = [t for t in complete if int(t["head_units"]) == units]
            axes.scatter(
                [float(t["learning_rate"]) for t in chosen],
                [t["value"] for t in chosen],
                marker=marker,
                color=palette[variant],
                alpha=0.8,
                label=f"head_units={units}",
            )
        best = tune["best"]
        axes.scatter([best["learning_rate"]], [best["value"]], s=180, facecolors="none", edgecolors="black")
        for end in best["search_space"]["learning_rate"]:
            axes.axvline(end, color="grey", linestyle="--", linewidth=1)
        edge = f", at the {best['learning_rate_at_edge']} edge" if best.get("learning_rate_at_edge") else ""
        axes.set_title(f"{variant}: units={best['head_units']}, lr={best['learning_rate']:.2g}{edge}", fontsize=10)
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.grid(alpha=0.3)
    for axes in grid[:, 0]:
        axes.set_ylabel("validation accuracy (kept epoch; x: at the rung)")
    grid.flat[0].legend(fontsize=8)
    figure.suptitle("Tuning per strategy: trial value against learning rate (ring: chosen; dashed: searched range)")
    figure.tight_layout()
    return figure
