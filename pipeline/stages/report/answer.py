"""The report's opening: the answer, the reference baselines and the checks behind them
(convergence of every run, tuned learning rates inside their range, the interval method)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.analysis.recommendation import describe
from pipeline.core.results import PIXELS, PROBE
from pipeline.core.stats import difference_interval
from pipeline.core.vgg16 import FULL_BASE

HEAD_PROBE_TOLERANCE = 0.02  # a head-only strategy further below the convex probe on its features is flagged
BASELINE_NAMES = {PIXELS: "logistic regression on pixels", PROBE: "convex linear probe on the frozen features"}
INTERVAL_METHOD = (
    "Intervals are 95% intervals over both sources of noise, training seeds and test images: a seeds × images "
    "table of correct predictions is read as a two-way random-effects model, and the variance of its mean is the "
    "unbiased (MS_seed + MS_image − MS_residual) / (seeds × images), the seed component floored at 0; a "
    "difference between two strategies is paired on the same test images (independent over seeds). The "
    "half-width is a Student-t quantile with Satterthwaite degrees of freedom times the standard error; the "
    "answer's non-inferiority bounds are one-sided 95% (`pipeline/core/stats.py`; coverage and the decision's error "
    "rate at the margin are tested on simulated predictions with a known truth). Cost is training FLOPs "
    "(`pipeline/analysis/cost.py`: 2 × multiply-accumulates forward; backward: the weight gradient of every layer that "
    "trains and the input gradient of every layer above one that does; every epoch's validation pass; the "
    "frozen prefix once), a unit that reruns identically; measured seconds are a machine-dependent column."
)


def signed_interval(interval) -> str:
    """A difference with its interval: `+0.028 [+0.000, +0.055]`."""
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


def tflop(flops: float) -> str:
    """FLOPs as TFLOP with three significant digits ("126 TFLOP", "0.0431 TFLOP")."""
    return f"{flops / 1e12:.3g} TFLOP"


def _name(name: str) -> str:
    return BASELINE_NAMES.get(name, f"`{name}`")


def rule_lines(answer: dict, name: Callable[[str], str] = _name, among: str = "") -> list[str]:
    """The main answer's rule applied to the candidates of `answer` (`recommendation.choose`,
    FLOPs added), in words: the best on validation (`among`: what it was chosen from), what is
    shown non-inferior to it within the margin, the cheapest of those in training FLOPs, and how
    every other candidate compares. `name` writes a candidate's name."""
    best, recommended, margin = answer["best_on_validation"], answer["recommended"], answer["margin"]
    flops, comparisons = answer["flops"], answer["comparisons"]
    others = sorted((v for v in answer["candidates"] if v != best), key=lambda v: flops[v])
    lines = [
        f"Best on validation{among}: {name(best)}.",
        f"Non-inferior to it within {margin:g} (one-sided 95% lower bound above −margin): "
        + (", ".join(f"{name(v)} ({comparisons[v]['lower_bound']:+.3f})" for v in others) or "none")
        + ".",
    ]
    if recommended != best:
        lines.append(
            f"Cheapest of those in training FLOPs (tuning + one training run + feature extraction): "
            f"{name(recommended)}, {answer['cheaper_than_best']:.1f}× cheaper than {name(best)} "
            f"({tflop(flops[recommended])} vs {tflop(flops[best])})."
        )
    else:
        lines.append(f"Nothing cheaper is shown non-inferior to {name(best)} ({tflop(flops[best])}).")
    rest = [v for v in comparisons if v not in answer["candidates"]]
    if rest:
        lines.append(
            "Not shown non-inferior: "
            + "; ".join(
                f"{name(v)} {describe(v, comparisons[v], margin)}" for v in sorted(rest, key=lambda v: flops[v])
            )
            + "."
        )
    return lines


def answer_lines(answer: dict, val: dict, test_mean: dict, seeds: dict) -> list[str]:
    """The answer's sentences, in the words the statistics allow (pipeline/analysis/recommendation.py)."""
    best, recommended, margin = answer["best_on_validation"], answer["recommended"], answer["margin"]
    flops, network = answer["flops"], answer["recommended_network"]
    lines = []
    if recommended in answer["baselines_non_inferior"]:
        c = answer["comparisons"][recommended]
        lines.append(
            f"**On this data, training VGG16 does not pay off: {_name(recommended)} is non-inferior to the best "
            f"network `{best}` within {margin:g}** (difference {c['mean']:+.3f}, one-sided 95% lower bound "
            f"{c['lower_bound']:+.3f}) at {answer['cheaper_than_best']:,.3g}× less compute "
            f"({tflop(flops[recommended])} vs {tflop(flops[best])})."
        )
    elif recommended != best:
        c = answer["comparisons"][recommended]
        lines.append(
            f"**Recommended: `{recommended}`**: non-inferior to `{best}` within {margin:g} (difference "
            f"{c['mean']:+.3f}, one-sided 95% lower bound {c['lower_bound']:+.3f}) and "
            f"{answer['cheaper_than_best']:.1f}× cheaper ({tflop(flops[recommended])} vs {tflop(flops[best])})."
        )
    else:
        lines.append(
            f"**Recommended: `{best}`**, the best on validation: no cheaper strategy or baseline is shown "
            f"non-inferior to it within {margin:g} ({tflop(flops[best])})."
        )
    lines.append(
        f"Best on validation: `{best}` (mean best-validation accuracy {val[best]:.3f} over {seeds[best]} seeds; "
        f"test accuracy {test_mean[best]:.3f})."
    )
    others = [n for n in answer["candidates"] if n != best]
    lines.append(
        f"Non-inferior to it within {margin:g} (one-sided 95% lower bound of the difference, seeds and test "
        "images, above −margin): "
        + (", ".join(f"{_name(n)} ({answer['comparisons'][n]['lower_bound']:+.3f})" for n in others) or "none")
        + "."
    )
    rest = [n for n in answer["comparisons"] if n not in answer["candidates"]]
    if rest:
        lines.append(
            "Not candidates: "
            + "; ".join(f"{_name(n)} {describe(n, answer['comparisons'][n], margin)}" for n in rest)
            + "."
            + (
                " A difference that is not significant is not shown to be small: such a strategy is not recommended."
                if any(answer["comparisons"][n]["verdict"] == "inconclusive" for n in rest)
                else ""
            )
        )
    if recommended != network:
        lines.append(
            f"Among the networks the rule recommends `{network}` ({tflop(flops[network])}); it is the model the "
            "register stage registers."
        )
    return lines


def head_probe_check(variant: str, head: float, probe: dict) -> str:
    """The check of a head-only strategy (mean test accuracy `head`) against the convex probe on
    the same features (the baselines stage's record); flagged beyond `HEAD_PROBE_TOLERANCE`."""
    gap = head - probe["test_accuracy"]
    flag = f"**Head more than {HEAD_PROBE_TOLERANCE} below its probe**: " if gap < -HEAD_PROBE_TOLERANCE else ""
    return (
        f"{flag}`{variant}` (a head trained by Adam under the training rule on the frozen base) reaches "
        f"{head:.3f}; the convex probe on the same features ({probe.get('features', 'the frozen base')}), "
        f"solved to optimality, {probe['test_accuracy']:.3f} (gap {gap:+.3f}). A large negative gap means "
        "the head is under-trained (its learning rate or head size), not that the features are weak."
    )


def answer_blocks(
    results: dict, tuning: dict, baselines: dict, answer: dict, unconverged: dict, probes: dict | None = None
) -> list[tuple]:
    """The answer, then the checks behind it: the pixel baseline, stability, head-only strategies
    against their probes, convergence, learning rates at the edge of their range, tuning."""
    val = {v: r["evidence"]["val_accuracy"] for v, r in results.items()}
    test_mean = {v: r["interval"].mean for v, r in results.items()}
    seeds = {v: len(r["evidence"]["seeds"]) for v, r in results.items()}
    checks = _pixel_check(results, baselines) + stability_checks(baselines, answer)
    for variant in head_only(results):
        cut = results[variant].get("cut_after", FULL_BASE)
        record = baselines.get(PROBE) if cut == FULL_BASE else (probes or {}).get(cut)
        if record is not None:
            checks.append(head_probe_check(variant, results[variant]["interval"].mean, record))
    checks += [_convergence_check(results, unconverged), *_edge_check(tuning), *tuning_checks(tuning)]
    return [
        ("h2", "Answer"),
        ("list", answer_lines(answer, val, test_mean, seeds)),
        ("p", "Checks behind the answer:"),
        ("list", checks),
        ("p", INTERVAL_METHOD),
    ]


def _pixel_check(results: dict, baselines: dict) -> list[str]:
    pixels = versus_pixels(results, baselines)
    if not pixels:
        return []
    reference = baselines[PIXELS]["test_accuracy"]
    beat = [v for v, (_, verdict) in pixels.items() if verdict == "beats it"]
    rest = [f"`{v}` ({verdict}, {signed_interval(d)})" for v, (d, verdict) in pixels.items() if verdict != "beats it"]
    return [
        f"Pixel baseline ({BASELINE_NAMES[PIXELS]}): test accuracy {reference:.3f}. Strategies that "
        f"beat it with an interval excluding 0: {', '.join(f'`{v}`' for v in beat) or 'none'}"
        + (f"; the others: {'; '.join(rest)}." if rest else ".")
    ]


def _convergence_check(results: dict, unconverged: dict) -> str:
    flagged = {v: seeds for v, seeds in unconverged.items() if seeds}
    if flagged:
        return (
            "**Not converged** (best epoch in the last 25% of `train.max_epochs` and patience never ran "
            "out: still improving when the budget ended): "
            + "; ".join(f"`{v}` seeds {seeds}" for v, seeds in flagged.items())
            + ". Raise `train.max_epochs` and rerun before trusting these rows."
        )
    runs = sum(len(r["convergence"]) for r in results.values())
    return (
        f"Convergence: all {runs} runs either stopped early (patience ran out) or kept an epoch before "
        "the last 25% of `train.max_epochs`."
    )


def _edge_check(tuning: dict) -> list[str]:
    edges = {
        v: t["best"]["learning_rate_at_edge"] for v, t in tuning.items() if t and t["best"].get("learning_rate_at_edge")
    }
    if edges:
        return [
            "**Tuned learning rate at the edge of the searched range** (the optimum may lie outside it; "
            "widen `tune.learning_rate`, or for a head-only strategy `tune.learning_rate_head_only`, which "
            "`tune.head_only_reference_features` scales per head): "
            + ", ".join(f"`{v}` ({e} end)" for v, e in edges.items())
            + "."
        ]
    if any(tuning.values()):
        return [
            "Every tuned learning rate lies inside the searched range (not within 10% of its log width "
            "from either end)."
        ]
    return []


def stability_checks(baselines: dict, answer: dict) -> list[str]:
    """How far the baselines' test predictions move with the solver's summation order, and
    whether a baseline's non-inferiority survives that move."""
    measured = {name: b["stability"] for name, b in baselines.items() if b.get("stability")}
    if not measured:
        return []
    first = next(iter(measured.values()))
    moves = "; ".join(
        f"{BASELINE_NAMES[name]} {m['max_changed_predictions']} of {baselines[name]['test_images']}"
        for name, m in measured.items()
    )
    tol = next(iter(baselines.values())).get("tol")
    line = (
        ("Baselines are solved by L-BFGS" + (f" to tolerance {tol:g}" if tol else "")) + "; refitting each "
        f"at its chosen C on the training rows in {first['reorderings']} other orders (floating-point summation "
        f"order, what another machine changes) changed at most: {moves} test predictions. Their test "
        "accuracies can differ across machines by that much (the networks' have rerun bit-identical)."
    )
    margin = answer.get("margin")
    for name in answer.get("baselines_non_inferior", []):
        if name in measured:
            bound = answer["candidates"][name]["lower_bound"]
            shifted = bound - measured[name]["max_accuracy_change"]
            verdict = "still above" if shifted > -margin else "no longer above"
            line += (
                f" The lower bound of {BASELINE_NAMES[name]}, "
                f"{bound:+.3f}, lowered by that move ({measured[name]['max_accuracy_change']:.4f}), is "
                f"{shifted:+.3f}: {verdict} −{margin:g}."
            )
    return [line]


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
