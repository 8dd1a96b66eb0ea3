"""The report's "Study: beyond layer freezing" section (studies.parameter_efficient).

The study's strategies choose which *parameters* train (bias-only, LoRA, scale-and-shift) or train
one block alone (surgical), each tuned and trained like the main comparison's strategies, so they
are read together with them under the main comparison's rules:

  the answer        the main answer's rule over the main strategies, the study's and the baselines
  the strategies    each study strategy: what it trains, its parameters, its path and s/epoch, its
                    test accuracy against the pixel baseline and against the best on validation
  surgical vs depth train block k alone, or block k and every block above it (the top-down depth
                    sweep at block boundaries): paired differences, k = 1..5
  under shift       the robustness test of the strategies that took it: which surgical block is
                    most accurate on the corrupted test set (Lee et al. 2023 expect block 1 for
                    input-level shifts), paired over seeds
  accuracy vs cost  the Pareto view over every strategy that ran (`pareto`)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis import cost
from pipeline.analysis.recommendation import baseline_evidence, choose, describe, with_flops
from pipeline.core.results import read_evidence, read_strategy, read_tuning
from pipeline.core.stats import accuracy_interval, difference_interval, paired_t_test
from pipeline.core.vgg16 import BLOCKS, FULL_BASE
from pipeline.stages.report import diagnostics, figures, pareto
from pipeline.stages.report.answer import BASELINE_NAMES, PIXELS, signed_interval, tflop, unconverged

KIND_WORDS = {
    "all": "",
    "bias": "conv biases only",
    "lora": "LoRA rank {rank} on the kernels",
    "scale_shift": "a scale and shift per channel",
}


def read(studies_dir: Path, params, data_summary: dict) -> dict:
    """{name: result} for the study's strategies (`studies.parameter_efficient.run`) whose results
    exist: `results.read_strategy` plus its `evidence` with FLOPs (the main comparison's account),
    its test accuracy `interval`, its `tuning` record and its `definition` (VariantParams)."""
    study = params.studies.parameter_efficient
    train_dir = Path(studies_dir) / "parameter_efficient" / "train"
    tune_dir = Path(studies_dir) / "parameter_efficient" / "tune"
    layout = cost.layout_of(data_summary, params.model.pooling)
    out = {}
    for name in study.run:
        if not (train_dir / name / "seeds").is_dir():
            continue
        strategy = study.strategies[name]
        result = read_strategy(train_dir, name)
        evidence = read_evidence(train_dir, tune_dir, name)
        result["evidence"] = with_flops(evidence, strategy.layers, layout, strategy.parameters)
        result["interval"] = accuracy_interval(result["evidence"]["correct"])
        result["tuning"] = read_tuning(tune_dir, name)
        result["definition"] = strategy
        out[name] = result
    return out


def combined_answer(params, main: dict, study: dict, baselines: dict, data_summary: dict) -> dict:
    """The main answer's rule (`recommendation.choose`) over the main strategies, the study's and
    the baselines: one candidate set, one margin, one cost unit."""
    layout = cost.layout_of(data_summary, params.model.pooling)
    evidence = {v: r["evidence"] for v, r in {**main, **study}.items()}
    return choose(evidence, params.report.margin, baseline_evidence(baselines, layout))


def _plain(strategy) -> bool:
    """A strategy that differs from another only in its trainable layers: whole base, every
    parameter, no warm-up, no per-block rates, the model's weights."""
    return (
        strategy.parameters == "all"
        and strategy.cut_after == FULL_BASE
        and not strategy.warmup_epochs
        and not strategy.lr_multipliers
        and strategy.weights is None
    )


def surgical_pairs(params, names: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """{block: (a strategy training that block alone, one training it and every block above it)}
    among `names` (main strategies first, then the study's), matched on their definitions, not
    their names; None where none ran. At block5 both are the same layers: the study's strategy
    (the last one named) is "alone", the main one (the first) "and above"."""
    definitions = {**params.variants, **params.studies.parameter_efficient.strategies}
    plain = [name for name in names if _plain(definitions[name])]
    blocks = list(BLOCKS)
    pairs = {}
    for index, block in enumerate(blocks):
        alone = [n for n in plain if definitions[n].layers == frozenset(BLOCKS[block])]
        above_layers = frozenset(layer for b in blocks[index:] for layer in BLOCKS[b])
        above = [n for n in plain if definitions[n].layers == above_layers]
        if block == blocks[-1]:
            pair = (alone[-1], alone[0]) if len(alone) > 1 else (alone[0], None) if alone else (None, None)
        else:
            pair = (alone[0] if alone else None, above[0] if above else None)
        if any(pair):
            pairs[block] = pair
    return pairs


def _trains(result: dict) -> str:
    strategy = result["definition"]
    layers = strategy.layers
    blocks = [b for b, names in BLOCKS.items() if set(names) <= layers]
    where = "every conv layer" if len(blocks) == len(BLOCKS) else " + ".join(blocks) or "the head only"
    kind = KIND_WORDS[strategy.parameters].format(rank=strategy.lora_rank)
    return f"{where}: {kind}" if kind else where


def strategy_table(study: dict, everything: dict, answer: dict, baselines: dict) -> tuple[list[str], list[list[str]]]:
    """Each study strategy: what it trains, its counts, path, cost, accuracy, and its paired
    differences against the best on validation (`everything`: main and study strategies) and the
    pixel baseline."""
    best = answer["best_on_validation"]
    headers = [
        "strategy",
        "trains",
        "trainable (base + head)",
        "path",
        "s / epoch",
        "test accuracy (95%)",
        f"Δ vs `{best}` (best on validation)",
        "Δ vs pixels LR",
        "cost",
        "unconverged",
        "learning rate",
    ]
    rows = []
    best_correct = everything[best]["evidence"]["correct"] if best in everything else baselines[best]["correct"]
    for name, r in study.items():
        correct = r["evidence"]["correct"]
        versus_best = "—" if name == best else signed_interval(difference_interval(correct, best_correct))
        pixels = baselines.get(PIXELS)
        versus_pixels = signed_interval(difference_interval(correct, pixels["correct"])) if pixels else "—"
        cut = cost.cut_of(r["training_path"])
        edge = (r["tuning"] or {}).get("best", {}).get("learning_rate_at_edge")
        rows.append(
            [
                f"`{name}`",
                _trains(r),
                f"{r['parameters']['trainable']:,}",
                f"cached on {cut}" if cut else "end to end",
                f"{np.median(list(r['seconds_per_epoch'].values())):.2f}",
                _cell(r["interval"]),
                versus_best,
                versus_pixels,
                tflop(r["evidence"]["flops"]),
                str(len(unconverged(r))),
                f"{r['learning_rate']:.2g}" + (f" ({edge} edge)" if edge else ""),
            ]
        )
    return headers, rows


def surgical_table(pairs: dict, everything: dict) -> tuple[list[str], list[list[str]]]:
    """Per block k: the strategy training it alone and the one training it and every block above,
    their trainable parameters and test accuracy, and their paired difference."""
    headers = ["block k", "k alone", "trainable", "test accuracy", "k and above", "trainable", "test accuracy"]
    headers.append("alone − and above (paired, 95%)")
    rows = []
    for block, names in pairs.items():
        cells = []
        for name in names:
            r = everything.get(name)
            cells += [f"`{name}`", f"{r['parameters']['trainable']:,}", _cell(r["interval"])] if r else ["—", "", ""]
        alone, above = (everything.get(name) for name in names)
        paired = (
            difference_interval(alone["evidence"]["correct"], above["evidence"]["correct"]) if alone and above else None
        )
        rows.append([block, *cells, signed_interval(paired) if paired else "—"])
    return headers, rows


def _cell(interval) -> str:
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def corrupted_accuracy(result: dict) -> dict[int, float]:
    """{seed: mean accuracy over the corruptions} of a strategy that took the robustness test."""
    return {seed: float(np.mean(list(r["accuracy"].values()))) for seed, r in result.get("robustness", {}).items()}


def shift_lines(pairs: dict, everything: dict) -> list[str]:
    """Which surgical block is most accurate on the corrupted test set, and how each other block
    compares with it (paired over seeds, 95% t-interval): the surgical-fine-tuning claim checked."""
    surgical = {b: everything[a] for b, (a, _) in pairs.items() if a in everything and everything[a].get("robustness")}
    if len(surgical) < 2:
        return []
    corrupted = {b: corrupted_accuracy(r) for b, r in surgical.items()}
    best = max(corrupted, key=lambda b: np.mean(list(corrupted[b].values())))
    clean_best = max(surgical, key=lambda b: surgical[b]["interval"].mean)
    lines = [
        f"On the corrupted test set (mean over the corruptions) the most accurate single block is {best} "
        f"({np.mean(list(corrupted[best].values())):.3f}); on the clean test set it is {clean_best} "
        f"({surgical[clean_best]['interval'].mean:.3f})."
    ]
    for block in surgical:
        if block == best:
            continue
        test = paired_t_test(corrupted[best], corrupted[block])
        d = test.difference
        if d.low is None:
            lines.append(f"{best} − {block}: {d.mean:+.3f} (one seed: no interval).")
            continue
        verdict = "supported" if d.low > 0 else "not significant (not a claim that they are equal)"
        lines.append(f"{best} − {block} under corruption: {signed_interval(d)} over {d.n} seeds, {verdict}.")
    return lines


def draw(main: dict, study: dict, references: dict[str, float]) -> dict:
    """{figure id: drawing function}: the Pareto view and the robustness bars over every strategy."""
    if not study:
        return {}
    everything = {**main, **study}
    palette = figures.colours(list(everything))
    drawings = {"beyond_pareto": lambda: pareto.figure(everything, palette, references)}
    robust = {v: r for v, r in everything.items() if r.get("robustness")}
    if robust:
        drawings["beyond_robustness"] = lambda: diagnostics.robustness_figure(robust, palette)
    return drawings


def answer_lines(answer: dict) -> list[str]:
    """The combined answer in the main answer's words (`recommendation.describe`)."""
    best, recommended, margin = answer["best_on_validation"], answer["recommended"], answer["margin"]
    flops, comparisons = answer["flops"], answer["comparisons"]
    name = lambda v: BASELINE_NAMES.get(v, f"`{v}`")  # noqa: E731
    shown = sorted((v for v in answer["candidates"] if v != best), key=lambda v: flops[v])
    lines = [
        f"Best on validation among every strategy and baseline: {name(best)}.",
        f"Shown non-inferior to it within {margin:g}: "
        + (", ".join(f"{name(v)} ({comparisons[v]['lower_bound']:+.3f})" for v in shown) or "none")
        + ".",
        f"Recommended (the cheapest of those in training FLOPs): {name(recommended)}, {tflop(flops[recommended])}.",
    ]
    rest = sorted((v for v in comparisons if v not in answer["candidates"]), key=lambda v: flops[v])
    lines += [f"{name(v)}: {describe(v, comparisons[v], margin)}." for v in rest]
    return lines


def blocks(params, main: dict, study: dict, baselines: dict, files: dict, data_summary: dict) -> list[tuple]:
    """The section, when the study ran."""
    if not study:
        return []
    answer = combined_answer(params, main, study, baselines, data_summary)
    everything = {**main, **study}
    pairs = surgical_pairs(params, list(everything))
    doc: list[tuple] = [
        ("h2", "Study: beyond layer freezing"),
        (
            "p",
            f"Which parameters train, not only which layers: {len(study)} strategies of "
            "`studies.parameter_efficient`, each tuned with the main comparison's budget "
            f"({params.tune.n_trials} trials) and trained under its rule on seeds {list(params.train.seeds)}, read "
            "beside the main strategies with the same intervals (95%, seeds and test images; differences paired on "
            "the test images). Bias-only, LoRA and scale-and-shift train end to end where they reach block1 (their "
            "frozen kernels still run every epoch); a surgical block trains on the cached output of the blocks "
            "below it. The saved models merge into a plain VGG16 (LoRA and bias-only exactly).",
        ),
        ("h3", "The answer over every strategy that ran"),
        ("list", answer_lines(answer)),
        ("table", *strategy_table(study, everything, answer, baselines)),
    ]
    if pairs:
        doc += [
            ("h3", "Surgical single blocks beside the top-down depth sweep"),
            (
                "p",
                "Train block k alone (surgical fine-tuning) or block k and every block above it (the depth sweep at "
                "block boundaries: block5 and above is `partial`-like, block1 and above is full fine-tuning). The "
                "strategies are matched on their definitions; at block5 both columns train the same layers, so "
                "their difference is tuning and seed noise (a floor for the other rows).",
            ),
            ("table", *surgical_table(pairs, everything)),
        ]
    shift = shift_lines(pairs, everything)
    robust = {v: r for v, r in everything.items() if r.get("robustness")}
    if robust:
        corruptions = ", ".join(params.studies.robustness.corruptions)
        doc += [
            ("h3", "Under input-level shift"),
            (
                "p",
                f"The study's models (and any main one that took it) on corrupted copies of the test set ({corruptions}"
                f" at severity {params.studies.robustness.severity}): accuracy mean ± 95% CI over seeds.",
            ),
        ]
        doc += [("list", shift)] if shift else []
        doc += [
            ("table", *diagnostics.robustness_table(robust)),
            (
                "figure",
                files["beyond_robustness"],
                "Clean and corrupted accuracy of every strategy that took the test.",
            ),
        ]
    return [
        *doc,
        ("h3", "Accuracy against cost, every strategy"),
        ("p", "The main comparison's Pareto view with the study's strategies added (how to read it: above)."),
        ("figure", files["beyond_pareto"], "Test accuracy against trainable parameters and training FLOPs."),
        ("table", *pareto.table(everything)),
    ]
