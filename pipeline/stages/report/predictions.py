"""The report's section "What the cheap predictors said": the `predict` stage's rankings
(results/predict/scores.json) beside the measured ranking of the strategies, scored with Kendall's
tau and a bootstrap interval over the training seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from pipeline.runtime.errors import DataError

PIXELS = "pixels"  # the predict stage's name of the pixel source (the report never imports a stage)

BOOTSTRAP = 2000  # resamples of the seeds
BOOTSTRAP_SEED = 0  # fixed: the interval is a property of the results, not a draw of the experiment
LABELS = {
    "ridge_probe": "ridge probe (validation accuracy)",
    "logme": "LogME",
    "h_score": "H-score (Ledoit-Wolf)",
    "transrate": "TransRate",
    "gbc": "GBC",
}


def read_predictions(folder: Path) -> dict:
    """scores.json of the predict stage; DataError when it is missing."""
    path = Path(folder) / "scores.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro predict` first")
    return json.loads(path.read_text())


def tau(predicted: list[float], measured: list[float]) -> tuple[float, float]:
    """(Kendall's tau-b, its p-value against no association; exact for few strategies without
    ties); NaN for both when either side is constant (no ranking to agree with)."""
    result = kendalltau(predicted, measured)
    return float(result.statistic), float(result.pvalue)


def agreement(predicted: dict[str, float], per_seed: dict[str, dict[int, float]]) -> dict:
    """Kendall's tau between predicted scores and measured mean test accuracy over the strategies
    in both, and its 95% percentile interval over BOOTSTRAP resamples of the seeds (one draw of
    seeds for every strategy: they share seeds). Test-image noise is not in the interval."""
    names = sorted(set(predicted) & set(per_seed))
    if len(names) < 3:
        raise DataError(f"a ranking needs 3 strategies both predicted and measured; got {names}")
    seeds = sorted(set.intersection(*(set(per_seed[n]) for n in names)))
    table = np.array([[per_seed[n][s] for s in seeds] for n in names])  # strategies x seeds
    scores = [predicted[n] for n in names]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = [tau(scores, table[:, rng.integers(0, len(seeds), len(seeds))].mean(axis=1))[0] for _ in range(BOOTSTRAP)]
    low, high = np.nanpercentile(draws, [2.5, 97.5]) if len(seeds) > 1 else (np.nan, np.nan)
    value, p_value = tau(scores, table.mean(axis=1))
    pairs = len(names) * (len(names) - 1) / 2
    tied = sum(k * (k - 1) / 2 for k in np.unique(scores, return_counts=True)[1])
    return {
        "tau": value,
        "p": p_value,
        "low": float(low),
        "high": float(high),
        "n": len(names),
        "ceiling": float(np.sqrt(1 - tied / pairs)) if pairs else 0.0,  # tau-b against a measured order without ties
    }


def rows(record: dict, results: dict) -> list[list[str]]:
    """One row per predictor: its best strategy (or depth cell) among `results`, that one's measured
    accuracy, tau [interval] and the largest tau its ties allow."""
    per_seed = {v: r["test_accuracy"] for v, r in results.items()}
    measured = mean_accuracy(results)
    out = []
    for name in [n for n in LABELS if n in record["predictions"]]:
        scores = {v: s for v, s in record["predictions"][name]["scores"].items() if v in results}
        top = sorted(v for v in scores if scores[v] == max(scores.values()))  # tied: every one of them
        score = agreement(scores, per_seed)
        out.append(
            [
                LABELS[name],
                " = ".join(f"`{v}`" for v in top),
                " / ".join(f"{measured[v]:.3f}" for v in top),
                _number(score["tau"], "+.2f"),
                _number(score["p"], ".2g"),
                f"[{_number(score['low'], '+.2f')}, {_number(score['high'], '+.2f')}]",
                f"{score['ceiling']:.2f}",
            ]
        )
    return out


def _number(value: float, spec: str) -> str:
    return "—" if np.isnan(value) else format(value, spec)


HEADERS = [
    "predictor",
    "predicted best",
    "its measured test accuracy",
    "Kendall's τ",
    "p",
    "τ over seed resamples",
    "τ at most",
]


def _measured_help(record: dict, measured: dict[str, float], pixels: float | None) -> str:
    """The measured counterpart: the best strategy on pretrained weights (one predicted from more
    than the pixels) against the pixel baseline."""
    pretrained = [v for v in measured if record["strategy_sources"].get(v, [PIXELS]) != [PIXELS]]
    if pixels is None or not pretrained:
        return ""
    best = max(pretrained, key=measured.get)
    return (
        f" Measured: `{best}` reaches {measured[best]:.3f} test accuracy against {pixels:.3f} for logistic "
        f"regression on the pixels ({measured[best] - pixels:+.3f}; the comparison table has its interval)."
    )


def sweep_seconds(results: dict) -> float:
    """Measured seconds of the comparison: every strategy's tuning, feature extraction and runs."""
    total = 0.0
    for result in results.values():
        parts = result["evidence"]["compute_parts"]
        total += (
            parts["tuning"] + parts["feature_extraction"] + parts["training_per_run"] * len(result["test_accuracy"])
        )
    return total


def mean_accuracy(results: dict) -> dict[str, float]:
    """{strategy or cell: mean test accuracy over its seeds}."""
    return {v: float(np.mean(list(r["test_accuracy"].values()))) for v, r in results.items()}


def _by_size(sample: dict[str, dict[int, dict]]) -> dict[int, dict]:
    """{n: {strategy: result}} from the study's {strategy: {n: result}}."""
    out: dict[int, dict] = {}
    for variant, sizes in sample.items():
        for n, result in sizes.items():
            out.setdefault(n, {})[variant] = result
    return dict(sorted(out.items()))


def size_rows(record: dict, sample: dict[str, dict[int, dict]]) -> list[list[str]]:
    """The sample-efficiency study's rows (`sample`: its results by strategy and size): per size, each
    predictor's scores on that size's training subsets (the predict stage's `sample_efficiency`)
    against the strategies measured at that size."""
    out = []
    for n, measured in _by_size(sample).items():
        scored = record.get("sample_efficiency", {}).get(str(n))
        if scored is None:
            continue
        cells = {v: r for v, r in measured.items() if v in record["strategy_sources"]}
        if len(cells) >= 3:
            out += [[str(n), *row] for row in rows(scored, cells)]
    return out


def helps_rows(record: dict, sample: dict[str, dict[int, dict]], pixels: dict[int, float]) -> list[list[str]]:
    """ "Does transfer help?" per sample-efficiency size: the predicted difference (best pretrained
    source's probe minus the pixels', validation) beside the measured one (best strategy on
    pretrained weights minus logistic regression on the pixels, test) where that size's baselines ran."""
    out = []
    for n, measured in _by_size(sample).items():
        helps = record.get("sample_efficiency", {}).get(str(n), {}).get("transfer_helps")
        if helps is None:
            continue
        means = mean_accuracy(measured)
        pretrained = [v for v in means if record["strategy_sources"].get(v, [PIXELS]) != [PIXELS]]
        best = max(pretrained, key=means.get) if pretrained else None
        out.append(
            [
                str(n),
                f"`{helps['best_source']}` {helps['probe']:.3f}",
                f"{helps['pixels_probe']:.3f}",
                f"{helps['difference']:+.3f}",
                f"`{best}` {means[best]:.3f}" if best else "—",
                f"{pixels[n]:.3f}" if n in pixels else "—",
                f"{means[best] - pixels[n]:+.3f}" if best and n in pixels else "—",
            ]
        )
    return out


HELPS_HEADERS = [
    "images per class",
    "best source's probe (val)",
    "pixels' probe (val)",
    "predicted difference",
    "best pretrained strategy (test)",
    "pixel regression (test)",
    "measured difference",
]


def blocks(
    record: dict | None,
    results: dict,
    pixels: float | None = None,
    depth: dict | None = None,
    sample: dict[str, dict[int, dict]] | None = None,
    sample_pixels: dict[int, float] | None = None,
) -> list[tuple]:
    """The section, or nothing when the predict stage has not run. `depth`: the depth study's
    results by cell name (`top3`, `block3_top1`), scored the same way when the study ran; `sample`:
    the sample-efficiency study's results by strategy and size, each size against the scores the
    predict stage computed on that size's training subsets; `sample_pixels`: the study's pixel
    regression's test accuracy by size."""
    if record is None:
        return []
    return [
        *_strategy_blocks(record, results),
        *_depth_blocks(record, depth or {}),
        *_sample_blocks(record, sample or {}, sample_pixels or {}),
        *_helps_blocks(record, results, pixels),
    ]


def _strategy_blocks(record: dict, results: dict) -> list[tuple]:
    """The heading, how to read the table, and the main comparison's table."""
    measured = mean_accuracy(results)
    best = max(measured, key=measured.get)
    predicted = {v: r for v, r in results.items() if v in record["strategy_sources"]}
    return [
        ("h2", "What the cheap predictors said"),
        (
            "p",
            "Before any training, the `predict` stage scored the pretrained features of every block on the "
            f'{record["images"]["train"]} training images (one forward pass; README "Predicting the answer"). A '
            "strategy is predicted to reach the best score among the features it starts from: its cut block and "
            "the highest block below its first trained layer (the pixels when block1 trains or on random weights). "
            f"Measured best: `{best}` ({measured[best]:.3f}). Kendall's τ compares each predicted ranking with the "
            f"measured mean test accuracy of the {len(predicted)} strategies it predicts. `p`: Kendall's test "
            "against no association between the predicted and the "
            "measured order over these strategies; with this few strategies only a large τ is significant, and a "
            "p above 0.05 is no evidence that the score is uninformative. `τ over seed resamples`: the 2.5th and "
            "97.5th percentiles of τ when the seeds behind the measured means are resampled; it shows how much "
            "the measured order itself moves, not a confidence interval for the score's quality.",
        ),
        ("table", HEADERS, rows(record, predicted))
        if len(predicted) >= 3
        else ("p", "Fewer than 3 strategies: no ranking."),
        (
            "p",
            "`τ at most`: the largest τ the predictor can reach against these measurements, because strategies "
            "predicted from the same features tie."
            + "".join(f" `{v}` is not predicted: {why}." for v, why in record.get("not_predicted", {}).items()),
        ),
    ]


def _helps_blocks(record: dict, results: dict, pixels: float | None) -> list[tuple]:
    """Does transfer help (predicted and measured), where the gradient norms point, what it cost."""
    measured = mean_accuracy(results)
    out = []
    helps = record.get("transfer_helps")
    if helps:
        out.append(
            (
                "p",
                f"Does transfer help? Predicted: the ridge probe on `{helps['best_source']}` reaches "
                f"{helps['probe']:.3f} validation accuracy against {helps['pixels_probe']:.3f} on the pixels "
                f"({helps['difference']:+.3f}; optimistic for transfer: the best of {len(record['sources']) - 1} "
                "feature sources, chosen on the same validation images)." + _measured_help(record, measured, pixels),
            )
        )
    gradients = record["relative_gradient_norm"]["per_block"]
    if gradients:
        text = ", ".join(f"{block} {value:.2f}" for block, value in gradients.items())
        out.append(
            (
                "p",
                f"Relative gradient norm |dL/dW| / |W| per block at the pretrained weights with a fresh head (mean "
                f"over its conv layers): {text}. Auto-RGN would train `{record['auto_rgn_block']}` first; it ranks "
                "no strategy (where training acts, not how far it gets).",
            )
        )
    seconds = sweep_seconds(results)
    extra = record["seconds"].get("sample_efficiency", 0.0)
    main_seconds = record["seconds"]["total"] - extra
    text = (
        f"Cost on this machine: the prediction took {main_seconds:.0f} s, the measured comparison "
        f"{seconds / 60:.0f} min of tuning and training ({seconds / max(main_seconds, 1e-9):.0f}×)."
    )
    return [*out, ("p", text + (f" Scoring the sample-efficiency sizes took another {extra:.0f} s." if extra else ""))]


def _depth_blocks(record: dict, depth: dict) -> list[tuple]:
    """The depth study's cells ranked like the strategies, when at least 3 of them were predicted."""
    cells = {name: result for name, result in depth.items() if name in record["strategy_sources"]}
    if len(cells) < 3:
        return []
    cost = ""
    if all("compute_parts" in r.get("evidence", {}) for r in cells.values()):
        cost = f" The cells took {sweep_seconds(cells) / 60:.0f} min of tuning and training on this machine."
    return [
        ("p", f"The depth study's {len(cells)} cells, ranked the same way (its seeds, its test images):"),
        ("table", ["predictor", "predicted best cell", *HEADERS[2:]], rows(record, cells)),
        (
            "p",
            "The same rule maps a cell to its sources: the cut block and the block below its lowest trained layer."
            + cost,
        ),
    ]


def _sample_blocks(record: dict, sample: dict, sample_pixels: dict[int, float]) -> list[tuple]:
    """The sample-efficiency study: one ranking per size, then does transfer help at each size."""
    sizes = size_rows(record, sample)
    if not sizes:
        return []
    out = [
        (
            "p",
            "The sample-efficiency study, one ranking per training-set size: each score computed on the very "
            "subsets that size's seeds trained on (mean over those seeds), against the strategies' measured "
            "test accuracy at that size:",
        ),
        ("table", ["images per class", "predictor", *HEADERS[1:]], sizes),
    ]
    shown = {row[0] for row in sizes}
    skipped = {
        f"{LABELS[name]} at {n} per class: {why}"
        for n, size in record.get("sample_efficiency", {}).items()
        if n in shown
        for name, why in size.get("not_scored", {}).items()
    }
    if skipped:
        out.append(("p", "Not scored: " + "; ".join(sorted(skipped)) + "."))
    helped = helps_rows(record, sample, sample_pixels)
    if helped:
        out += [
            (
                "p",
                "Does transfer help at each size? Predicted: the ridge probe on the best pretrained source "
                "against the probe on the pixels, on the validation images (optimistic for transfer: the best "
                "of several sources, chosen on those images). Measured: the best strategy on pretrained weights "
                "against logistic regression on the pixels, mean test accuracy over the study's seeds (the "
                "study's table has the intervals).",
            ),
            ("table", HELPS_HEADERS, helped),
        ]
    return out
