"""The report's "Where the network is cut" section: the strategies' test accuracy against the block
after which their base ends, what each trains there and what its head receives.

Shown when the strategies use at least two cut points (`variants.<name>.cut_after`). A strategy's
kind (head only, the top kept block, the whole kept base) comes from its trainable parameters per
block, so the figure says what trained, not what a name suggests.
"""

from __future__ import annotations

from pipeline.core.plotting import plt
from pipeline.core.vgg16 import BLOCKS, FULL_BASE, head_features
from pipeline.stages.report.answer import PIXELS, signed_interval, versus_pixels

CUTS = list(BLOCKS)
KIND_MARKERS = {
    "head only": "o",
    "part of the top kept block + head": "v",
    "top kept block + head": "s",
    "whole kept base + head": "^",
    "other": "D",
}


def cut_points(results: dict) -> list[str]:
    """The cut points the strategies use, in network order."""
    return sorted({r.get("cut_after", FULL_BASE) for r in results.values()}, key=CUTS.index)


def kind(result: dict) -> str:
    """What a strategy trained, read from its per-block trainable and frozen parameter counts."""
    cut = result.get("cut_after", FULL_BASE)
    per_block = result["parameters"]["per_block"]
    kept = CUTS[: CUTS.index(cut) + 1]
    trained = [b for b in kept if per_block[b]["trainable"]]
    whole = all(per_block[b]["non_trainable"] == 0 for b in trained)
    if not trained:
        return "head only"
    if trained == [cut]:
        return "top kept block + head" if whole else "part of the top kept block + head"
    if trained == kept and whole:
        return "whole kept base + head"
    return "other"


def accuracy_vs_cut(
    results: dict, palette: dict, references: dict[str, float], probes: dict | None = None
) -> plt.Figure:
    """Test accuracy (mean, 95% interval) of every strategy at its cut point; marker = kind. `probes`
    ({cut: the baselines stage's probe record}) adds the convex probe on each cut's features."""
    cuts = cut_points(results)
    figure, axes = plt.subplots(figsize=(max(6.5, 2.2 * len(cuts)) + 2.5, 4.8))
    at_cut: dict[str, int] = {}
    for variant, result in results.items():
        cut = result.get("cut_after", FULL_BASE)
        offset = 0.08 * at_cut.get(cut, 0)  # side by side where several strategies share a cut
        at_cut[cut] = at_cut.get(cut, 0) + 1
        interval = result["interval"]
        x = cuts.index(cut) + offset
        yerr = [[interval.mean - interval.low], [interval.high - interval.mean]]
        axes.errorbar(
            x, interval.mean, yerr=yerr, fmt=KIND_MARKERS[kind(result)], color=palette[variant], capsize=4, markersize=7
        )
        axes.annotate(variant, (x, interval.mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    shown = {cut: r["test_accuracy"] for cut, r in (probes or {}).items() if cut in cuts}
    if shown:
        axes.plot(
            [cuts.index(c) - 0.1 for c in shown], list(shown.values()), "x", color="black", markersize=8,
            label="convex probe on the cut's features",
        )  # fmt: skip
    for (name, value), style in zip(references.items(), ("--", ":"), strict=False):
        axes.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name.replace('_', ' ')} {value:.3f}")
    for label, marker in KIND_MARKERS.items():
        if any(kind(r) == label for r in results.values()):
            axes.plot([], [], marker, color="grey", linestyle="none", label=label)
    axes.set_xticks(range(len(cuts)), [f"after {cut}" + (" (whole base)" if cut == FULL_BASE else "") for cut in cuts])
    axes.set_xlim(-0.4, len(cuts) - 0.4)
    axes.set_xlabel("where the base ends")
    axes.set_ylabel("test accuracy (mean, 95% interval)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    axes.set_title("Test accuracy against the cut point")
    figure.tight_layout()
    return figure


def cut_table(results: dict, baselines: dict, image_size: int, pooling: str) -> tuple[list[str], list[list[str]]]:
    """Per strategy, by cut point: what trains, the head's input size, trainable parameters, test
    accuracy and the difference from the pixel baseline (paired, 95% interval)."""
    headers = ["strategy", "cut after", "trains", "head input", "trainable parameters", "test accuracy", "− pixels"]
    against = versus_pixels(results, baselines) if PIXELS in baselines else {}
    rows = []
    for variant in sorted(results, key=lambda v: (CUTS.index(results[v].get("cut_after", FULL_BASE)), v)):
        r = results[variant]
        cut = r.get("cut_after", FULL_BASE)
        interval = r["interval"]
        difference = against.get(variant)
        rows.append(
            [
                f"`{variant}`",
                cut,
                kind(r),
                f"{head_features(image_size, cut, pooling):,}",
                f"{r['parameters']['trainable']:,}",
                f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]",
                "—" if difference is None else f"{signed_interval(difference[0])} ({difference[1]})",
            ]
        )
    return headers, rows


def blocks(params, results: dict, baselines: dict, files: dict) -> list[tuple]:
    """The section, when the strategies use two or more cut points."""
    if "accuracy_vs_cut" not in files:
        return []
    return [
        ("h2", "Where the network is cut"),
        (
            "p",
            "A strategy cut after block b keeps VGG16's blocks up to b (its pooling layer included) and removes "
            "the rest: they cost no FLOP and count in no parameter total. `head input`: the values the head "
            f"receives at {params.data.image_size}x{params.data.image_size} under `model.pooling: "
            f'{params.model.pooling}` (README "Where the network is cut"). Every strategy went through the same '
            "tuning, seeds and answer rule; the intervals are the comparison table's.",
        ),
        ("figure", files["accuracy_vs_cut"], "Test accuracy per strategy at its cut point; marker: what trains."),
        ("table", *cut_table(results, baselines, params.data.image_size, params.model.pooling)),
    ]
