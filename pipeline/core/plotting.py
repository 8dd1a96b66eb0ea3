"""Matplotlib figures drawn from result files (never from a network). Headless (Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np


def confusion_matrix_figure(matrix: list[list[int]], class_names: list[str], title: str) -> plt.Figure:
    """Counts per (true, predicted) class, row-normalised colours, counts printed in cells."""
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if rates[row, col] > 0.5 else "black"
        axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, label="share of the true class")
    figure.tight_layout()
    return figure
