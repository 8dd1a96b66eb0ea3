"""The report's opening: the answer, the reference baselines and the checks behind them
(convergence of every run, tuned learning rates inside their range, the interval method)."""

from __future__ import annotations

from pipeline.stats import Interval, difference_interval

PIXELS, PROBE = "pixels_logistic_regression", "frozen_linear_probe"
BASELINE_NAMES = {PIXELS: "logistic regression on pixels", PROBE: "convex linear probe on the frozen features"}
INTERVAL_METHOD = (
    "Intervals are 95% intervals over both sources of noise, training seeds and test images: the variance of "
    "a mean accuracy is var(per-seed accuracies)/seeds + var(per-image accuracies)/images, a difference between "
    "two strategies is paired on the same test images (independent over seeds), and the half-width is a "
    "Student-t quantile with Welch–Satterthwaite degrees of freedom times the standard error "
    "(`pipeline/stats.py`; its coverage is tested on simulated predictions with a known truth)."
)


def _signed(interval) -> str:
    return f"{interval.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def unconverged(result: dict) -> list[int]:
    """Seeds whose best epoch lies in the last 25% of max_epochs while patience never ran out:
    still improving when the budget ended (raise train.max_epochs)."""
    return [
        seed
        for seed, c in result["convergence"].items()
        if not c["stopped_early"] and c["best_epoch"] > 0.75 * c["max_epochs"]
    ]


def head_only(results: dict) -> list[str]:
    """The strategies that train no conv layer (the probe's features are their head's input)."""

    def trains_conv(result: dict) -> bool:
        return any(c["trainable"] for block, c in result["parameters"]["per_block"].items() if block != "head")

    return [v for v, r in results.items() if not trains_conv(r)]


def versus_pixels(results: dict, baselines: dict) -> dict[str, tuple]:
    """{strategy: (difference interval against the pixel baseline, verdict)}; {} without it."""
    if PIXELS not in baselines:
        return {}
    out = {}
    for variant, result in results.items():
        d = difference_interval(result["evidence"]["correct"], baselines[PIXELS]["correct"])
        verdict = "beats it" if d.low > 0 else "below it" if d.high < 0 else "not distinguishable"
        out[variant] = (d, verdict)
    return out


def answer_blocks(results: dict, tuning: dict, baselines: dict, answer: dict, unconverged: dict) -> list[tuple]:
    # one function on purpose (over 60 lines): it reads top to bottom in the order of the text it writes
    best, recommended = answer["best_on_validation"], answer["recommended"]
    tied = answer["indistinguishable_from_best"]
    cost = answer["compute_seconds"]
    val = {v: r["evidence"]["val_accuracy"] for v, r in results.items()}
    lines = [
        f"**Best on validation: `{best}`** (mean best-validation accuracy {val[best]:.3f} over "
        f"{len(results[best]['evidence']['seeds'])} seeds; test accuracy {results[best]['interval'].mean:.3f}).",
        "Statistically indistinguishable from it on the test set (the 95% interval of the difference contains 0): "
        + (", ".join(f"`{v}` ({_signed(_difference(answer, v))})" for v in tied) if tied else "none")
        + ".",
    ]
    if recommended == best:
        lines.append(
            f"**Recommended: `{best}`**: no indistinguishable strategy costs less compute "
            f"({cost[best]:.0f} s measured: tuning + one training run + feature extraction)."
        )
    else:
        lines.append(
            f"**Recommended: `{recommended}`**: as accurate as `{best}` within the intervals and "
            f"{cost[best] / cost[recommended]:.1f}× cheaper in measured compute ({cost[recommended]:.0f} s "
            f"vs {cost[best]:.0f} s: tuning + one training run + feature extraction)."
        )
    doc: list[tuple] = [("h2", "Answer"), ("list", lines)]
    checks = []
    pixels = versus_pixels(results, baselines)
    if pixels:
        reference = baselines[PIXELS]["test_accuracy"]
        beat = [v for v, (_, verdict) in pixels.items() if verdict == "beats it"]
        rest = [f"`{v}` ({verdict}, {_signed(d)})" for v, (d, verdict) in pixels.items() if verdict != "beats it"]
        checks.append(
            f"Pixel baseline ({BASELINE_NAMES[PIXELS]}): test accuracy {reference:.3f}. Strategies that "
            f"beat it with an interval excluding 0: {', '.join(f'`{v}`' for v in beat) or 'none'}"
            + (f"; the others: {'; '.join(rest)}." if rest else ".")
        )
    for variant in head_only(results) if PROBE in baselines else []:
        probe, frozen = baselines[PROBE]["test_accuracy"], results[variant]["interval"].mean
        features = baselines[PROBE].get("features", "the frozen base")
        checks.append(
            f"`{variant}` (a head trained by Adam under the training rule on the frozen base) reaches "
            f"{frozen:.3f}; the convex probe on the same features ({features}), solved to optimality, "
            f"{probe:.3f} (gap "
            f"{frozen - probe:+.3f}). A large negative gap would mean the head is under-trained, not that "
            "the features are weak."
        )
    flagged = {v: seeds for v, seeds in unconverged.items() if seeds}
    if flagged:
        checks.append(
            "**Not converged** (best epoch in the last 25% of `train.max_epochs` and patience never ran "
            "out: still improving when the budget ended): "
            + "; ".join(f"`{v}` seeds {seeds}" for v, seeds in flagged.items())
            + ". Raise `train.max_epochs` and rerun before trusting these rows."
        )
    else:
        runs = sum(len(r["convergence"]) for r in results.values())
        checks.append(
            f"Convergence: all {runs} runs either stopped early (patience ran out) or kept an epoch before "
            "the last 25% of `train.max_epochs`."
        )
    edges = {
        v: t["best"]["learning_rate_at_edge"] for v, t in tuning.items() if t and t["best"].get("learning_rate_at_edge")
    }
    if edges:
        checks.append(
            "**Tuned learning rate at the edge of the searched range** (the optimum may lie outside it; "
            "widen `tune.learning_rate`, or `tune.learning_rate_head_only` for a head-only strategy): "
            + ", ".join(f"`{v}` ({e} end)" for v, e in edges.items())
            + "."
        )
    elif any(tuning.values()):
        checks.append(
            "Every tuned learning rate lies inside the searched range (not within 10% of its log width "
            "from either end)."
        )
    checks += tuning_checks(tuning)
    doc += [("p", "Checks behind the answer:"), ("list", checks), ("p", INTERVAL_METHOD)]
    return doc


def tuning_checks(tuning: dict) -> list[str]:
    """Equal budgets, tune trials that hit the epoch cap, tuning curves still rising."""
    tuned = {v: t["best"] for v, t in tuning.items() if t}
    if not tuned:
        return []
    budgets = {b["budget"]["trials_run"] for b in tuned.values()}
    checks = [
        f"Tuning budget: {budgets.pop()} trials for every strategy."
        if len(budgets) == 1
        else "**Unequal tuning budgets**: "
        + ", ".join(f"`{v}` {b['budget']['trials_run']}" for v, b in tuned.items())
        + " trials."
    ]
    capped = {v: b["budget"]["capped_trials"] for v, b in tuned.items() if b["budget"]["capped_trials"]}
    checks.append(
        "**Tune trials that hit `train.max_epochs` still improving** (judged before they converged): "
        + ", ".join(f"`{v}` {n}" for v, n in capped.items())
        + "."
        if capped
        else "No tune trial hit `train.max_epochs` while still improving."
    )
    rising = [v for v, b in tuned.items() if b["tuning_curve"]["still_rising"]]
    if rising:
        checks.append(
            "**Tuning curve still rising at the budget** (the last trial is expected to add more than one "
            "validation image; more trials may change the ranking): " + ", ".join(f"`{v}`" for v in rising) + "."
        )
    return checks


def _difference(answer: dict, variant: str) -> Interval:
    d = answer["differences_from_best"][variant]
    return Interval(d["mean"], d["ci95_low"], d["ci95_high"], 0)


def baseline_rows(baselines: dict, headers: list[str]) -> list[list[str]]:
    """Reference rows for the comparison table, filled by column name (the others blank)."""
    rows = []
    for name, b in baselines.items():
        cells = {
            "strategy": f"*reference: {BASELINE_NAMES.get(name, name)}*",
            "test accuracy (mean, 95% CI)": f"{b['test_accuracy']:.3f} (deterministic)",
            "macro-F1": f"{b['test_macro_f1']:.3f}",
            "seeds": "–",
            "test images": str(b["test_images"]),
            "learning rate": f"L2 C={b['C']:g}",
        }
        rows.append([cells.get(h, "") for h in headers])
    return rows
