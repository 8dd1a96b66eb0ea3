"""The report's "Accuracy against cost" section: every strategy's test accuracy (95% interval)
against its trainable parameters and against its training FLOPs, the non-dominated strategies
marked, the baselines as reference lines.

A strategy is dominated when another costs no more and has at least its mean test accuracy, one
of the two strictly. The front is read on the means; whether the seeds and test images support a
dominance is the paired difference (the answer's interval, `stats.difference_interval`) between
the dominating strategy and the dominated one, which the table prints beside it.
"""

from __future__ import annotations

from pipeline.core.plotting import plt
from pipeline.core.stats import difference_interval
from pipeline.stages.report import figures
from pipeline.stages.report.answer import signed_interval, tflop

COSTS = {  # cost id -> (axis label, the strategy's cost from its report record)
    "parameters": ("trainable parameters", lambda result: result["parameters"]["trainable"]),
    "flops": ("training FLOPs (tuning + one run + extraction)", lambda result: result["evidence"]["flops"]),
}


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(cost, accuracy) `a` dominates `b`: no dearer, no less accurate, better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def points(results: dict, cost: str) -> dict[str, tuple[float, float]]:
    """{strategy: (cost, mean test accuracy)} for the cost id `cost`."""
    measure = COSTS[cost][1]
    return {v: (float(measure(r)), r["interval"].mean) for v, r in results.items()}


def front(at: dict[str, tuple[float, float]]) -> list[str]:
    """The non-dominated strategies, cheapest first."""
    kept = [v for v, p in at.items() if not any(_dominates(q, p) for w, q in at.items() if w != v)]
    return sorted(kept, key=lambda v: at[v])


def dominated_by(at: dict[str, tuple[float, float]], variant: str) -> str | None:
    """The most accurate strategy that dominates `variant` (the cheaper on a tie); None on the front."""
    above = [w for w, q in at.items() if w != variant and _dominates(q, at[variant])]
    return max(above, key=lambda w: (at[w][1], -at[w][0], w)) if above else None


def figure(results: dict, palette: dict, references: dict[str, float]) -> plt.Figure:
    """One panel per cost: mean and 95% interval per strategy, filled on the front, hollow when
    dominated; the front as a staircase (the best mean accuracy at no more than that cost)."""
    figure, panels = plt.subplots(1, len(COSTS), figsize=(13, 4.8), sharey=True)
    for axes, (cost, (label, _)) in zip(panels, COSTS.items(), strict=True):
        at = points(results, cost)
        on_front = front(at)
        for variant, result in results.items():
            interval, filled = result["interval"], variant in on_front
            axes.errorbar(
                *at[variant],
                yerr=figures.error_bar(interval),
                fmt="o",
                color=palette[variant],
                markerfacecolor=palette[variant] if filled else "white",
                capsize=4,
                markersize=7,
            )
            axes.annotate(variant, at[variant], textcoords="offset points", xytext=(6, 5), fontsize=8)
        xs, ys = [at[v][0] for v in on_front], [at[v][1] for v in on_front]
        axes.step([*xs, max(c for c, _ in at.values()) * 1.5], [*ys, ys[-1]], where="post", color="grey", linewidth=1)
        figures.reference_lines(axes, references)
        axes.set_xscale("log")
        axes.set_xlabel(f"{label} (log scale)")
        axes.grid(alpha=0.3, which="both")
    panels[0].set_ylabel("test accuracy (mean, 95% interval)")
    panels[-1].plot(
        [], [], "o", color="grey", markerfacecolor="white", linestyle="none", label="dominated (on the means)"
    )
    panels[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle("Accuracy against cost: filled = non-dominated, line = the front")
    figure.tight_layout()
    return figure


def _verdict(results: dict, at: dict, variant: str) -> str:
    above = dominated_by(at, variant)
    if above is None:
        return "on the front"
    d = difference_interval(results[above]["evidence"]["correct"], results[variant]["evidence"]["correct"])
    supported = "supported" if d.low > 0 else "not significant"
    return f"by `{above}`: {signed_interval(d)} ({supported})"


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per strategy, cheapest in parameters first: its costs, its accuracy, and for each cost
    whether it is on the front or which strategy dominates it, with their paired difference."""
    at = {cost: points(results, cost) for cost in COSTS}
    headers = ["strategy", "trainable parameters", "training cost", "test accuracy", "parameters", "FLOPs"]
    rows = []
    for variant in sorted(results, key=lambda v: at["parameters"][v]):
        interval = results[variant]["interval"]
        rows.append(
            [
                f"`{variant}`",
                f"{results[variant]['parameters']['trainable']:,}",
                tflop(results[variant]["evidence"]["flops"]),
                f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]",
                _verdict(results, at["parameters"], variant),
                _verdict(results, at["flops"], variant),
            ]
        )
    return headers, rows


def blocks(results: dict, files: dict) -> list[tuple]:
    """The section: the figure, the table and how to read them."""
    if "pareto" not in files:
        return []
    return [
        ("h2", "Accuracy against cost"),
        (
            "p",
            "Every strategy's test accuracy against what it trains (trainable parameters) and what it costs "
            "(training FLOPs, the answer's unit). A strategy is dominated when another has no more of the cost "
            "and at least its mean accuracy, one of the two strictly; the others form the front. The front is read "
            "on the means, so the table gives, for each dominated strategy, the paired difference (seeds and test "
            "images, 95%) between the most accurate strategy that dominates it and itself: `supported`, the "
            "interval excludes 0 and the dominating strategy is more accurate as well as no dearer; `not "
            "significant`, it is no dearer and the data do not tell the two accuracies apart (which is not a "
            "claim that they are equal). Lines: the baselines' test accuracy.",
        ),
        (
            "figure",
            files["pareto"],
            "Test accuracy against trainable parameters and training FLOPs; filled: on the front.",
        ),
        ("table", *table(results)),
    ]
