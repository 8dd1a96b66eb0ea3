"""The report's "Study: beyond layer freezing" section (studies.parameter_efficient).

The study's strategies choose which *parameters* train (bias-only, LoRA, scale-and-shift) or train
one block alone (surgical), each tuned and trained like the main comparison's strategies, so they
are read together with them under the main comparison's rules:

  the answer        the main answer's rule over the main strategies, the study's and the baselines
  the strategies    each study strategy: what it trains, its parameters, its path and s/epoch, its
                    test accuracy against the pixel baseline and against the best on validation
  surgical vs depth train block k alone, or block k and every block above it (the top-down depth
                    sweep at block boundaries): paired differences, k = 1..5
  block 1?          Lee et al. (2023) fine-tune the first block under input-level shifts: block1
                    alone against each other single block, clean and on corrupted test images
  corrupted images  the robustness test of the strategies that took it
  accuracy vs cost  the Pareto view over every strategy that ran (`pareto`)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis import cost
from pipeline.analysis.recommendation import baseline_evidence, choose, with_flops
from pipeline.core.results import read_evidence, read_strategy, read_tuning
from pipeline.core.stats import accuracy_interval, difference_interval, paired_t_test
from pipeline.core.vgg16 import BLOCKS, FULL_BASE, kind_words
from pipeline.stages.report import diagnostics, figures, pareto
from pipeline.stages.report.answer import PIXELS, rule_lines, signed_interval, tflop, unconverged


def read(studies_dir: Path, params, data_summary: dict) -> dict:
    """{name: result} for the study's strategies (`studies.parameter_efficient.run`) whose results
    exist: `results.read_strategy` plus its `evidence` with FLOPs (the main comparison's account),
    its test accuracy `interval`, its `tuning` record and its `definition` (VariantParams)."""
    study = params.studies.parameter_efficient
    definitions = {name: strategy for name, strategy in study.strategies.items() if name in study.run}
    train_dir = Path(studies_dir) / "parameter_efficient" / "train"
    tune_dir = Path(studies_dir) / "parameter_efficient" / "tune"
    layout = cost.layout_of(data_summary, params.model.pooling)
    out = {}
    for name in study.run:
        if not (train_dir / name / "seeds").is_dir():
            continue
        strategy = definitions[name]
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


def _plain(strategy, model_weights: str) -> bool:
    """A strategy that differs from another only in its trainable layers: whole base, every
    parameter, no warm-up, no per-block rates, the model's weights."""
    return (
        strategy.parameters == "all"
        and strategy.cut_after == FULL_BASE
        and not strategy.warmup_epochs
        and not strategy.lr_multipliers
        and strategy.weights in (None, model_weights)
    )


def surgical_pairs(params, main: list[str], study: list[str]) -> dict[str, tuple[str, str | None]]:
    """{block: (a strategy training that block alone, one training it and every block above it, or
    None)} for the blocks whose single-block strategy ran, matched on definitions, not names: the
    study's strategies first for "alone", the main ones first for "and above" (at block5 the two
    are the same layers, and two different strategies are paired). Empty unless one of the study's
    strategies is in a pair: the section is the study's."""
    definitions = {**params.variants, **params.studies.parameter_efficient.strategies}
    plain = {n for n in [*main, *study] if _plain(definitions[n], params.model.weights)}
    blocks = list(BLOCKS)
    pairs = {}
    for index, block in enumerate(blocks):
        above_layers = frozenset(layer for b in blocks[index:] for layer in BLOCKS[b])
        alone = [n for n in [*study, *main] if n in plain and definitions[n].layers == frozenset(BLOCKS[block])]
        above = [n for n in [*main, *study] if n in plain and definitions[n].layers == above_layers]
        if alone:
            pairs[block] = (alone[0], next((n for n in above if n != alone[0]), None))
    return pairs if any(name in study for pair in pairs.values() for name in pair) else {}


def _trains(result: dict) -> str:
    """What a study strategy trains: its layers (whole blocks by name), and of them which parameters."""
    strategy = result["definition"]
    parts = []
    for block, names in BLOCKS.items():
        chosen = [name for name in names if name in strategy.layers]
        parts.append(block if len(chosen) == len(names) else ", ".join(chosen))
    where = " + ".join(p for p in parts if p) or "the head only"
    where = "every conv layer" if strategy.layers and len(strategy.layers) == sum(map(len, BLOCKS.values())) else where
    kind = kind_words(strategy.parameters, strategy.lora_rank)
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


def _verdict(interval, what: str) -> str:
    if interval.low is None:
        return f"{interval.mean:+.3f} ({what}: one seed, no interval)"
    if interval.low > 0 or interval.high < 0:
        better = "better" if interval.low > 0 else "worse"
        return f"{signed_interval(interval)} ({what}: block1 {better}, supported)"
    return f"{signed_interval(interval)} ({what}: not significant, which is not a claim that they are equal)"


def block_one_lines(pairs: dict, everything: dict) -> list[str]:
    """Lee et al. (2023) find the first block the one to fine-tune under an input-level shift (our
    grey-scale 32x32 images are one from the pretraining data). Their claim, prespecified, so no
    selection: block1 alone against each other single block, on the clean test set (paired on
    seeds and test images) and, where the models took it, on the corrupted test set (mean over the
    corruptions, paired over seeds: a model fine-tuned on clean images tested on shifted ones)."""
    single = {block: everything[names[0]] for block, names in pairs.items() if names[0] in everything}
    if "block1" not in single or len(single) < 2:
        return []
    best = max(single, key=lambda b: single[b]["evidence"]["val_accuracy"])
    lines = [f"The best single block on validation accuracy is {best} (the answer's rule: choose on validation)."]
    one = single["block1"]
    for block, other in single.items():
        if block == "block1":
            continue
        clean = _verdict(difference_interval(one["evidence"]["correct"], other["evidence"]["correct"]), "clean test")
        line = f"block1 − {block}: {clean}"
        first, second = corrupted_accuracy(one), corrupted_accuracy(other)
        if set(first) & set(second):
            line += "; " + _verdict(paired_t_test(first, second).difference, "corrupted test, over seeds")
        lines.append(line + ".")
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


def blocks(params, main: dict, study: dict, baselines: dict, files: dict, data_summary: dict) -> list[tuple]:
    """The section, when the study ran."""
    if not study:
        return []
    answer = combined_answer(params, main, study, baselines, data_summary)
    everything = {**main, **study}
    missing = [name for name in params.studies.parameter_efficient.run if name not in study]
    pairs = surgical_pairs(params, list(main), list(study))
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
            "below it." + (f" Named in `run` but without results yet: {', '.join(missing)}." if missing else ""),
        ),
        ("h3", "The answer over every strategy that ran"),
        ("list", rule_lines(answer, among=" among every strategy and baseline")),
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
        lines = block_one_lines(pairs, everything)
        if lines:
            doc += [
                ("p", "Is block 1 the block to fine-tune (Lee et al. 2023, for input-level shifts)?"),
                ("list", lines),
            ]
    robust = {v: r for v, r in everything.items() if r.get("robustness")}
    if robust:
        corruptions = ", ".join(params.studies.robustness.corruptions)
        doc += [
            ("h3", "On corrupted test images"),
            (
                "p",
                "The models of every strategy that took the robustness test, fine-tuned on clean images and "
                f"evaluated on corrupted copies of the test set ({corruptions} at severity "
                f"{params.studies.robustness.severity}): accuracy mean ± 95% CI over seeds.",
            ),
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
