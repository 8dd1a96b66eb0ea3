"""The report's study sections: sample efficiency and freezing depth, under the main comparison's
rules: the same training rule, reference baselines, and intervals over seeds and test images.

Each section appears when its results exist: `read_studies` returns only what was run for the
current params, `draw` lists its figures and `study_blocks` writes the text and tables (the
block format of `pipeline.stages.report.document`).

  sample efficiency  every strategy at n training images per class, against the two baselines
                     fitted on each seed's very subset (`pipeline.stages.baselines --train-per-class`)
  freezing depth     top k conv layers trained, every k tuned; against the main comparison's
                     baselines (the same prepared data); the main answer's rule applied to the ks
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis import cost
from pipeline.analysis.recommendation import baseline_evidence, choose, with_flops
from pipeline.core.plotting import plt
from pipeline.core.results import read_evidence, read_sample_baselines, read_strategy, read_test_correct
from pipeline.core.stats import Interval, accuracy_interval, difference_interval
from pipeline.core.vgg16 import BLOCKS, CONV_LAYERS, FULL_BASE, kept_layers
from pipeline.runtime.errors import DataError
from pipeline.stages.report.answer import BASELINE_NAMES, PIXELS, PROBE, rule_lines, signed_interval, unconverged
from pipeline.stages.report.diagnostics import drift_heatmap, drift_text, mean_drift

BASELINE_STYLE = {PIXELS: ("black", "--", "pixels LR"), PROBE: ("dimgrey", ":", "linear probe")}


def _cell(interval: Interval) -> str:
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def ran(studies: dict) -> list[str]:
    """The names of the studies whose results `read_studies` found."""
    return [name for name in ("sample_efficiency", "depth") if name in studies]


def read_studies(studies_dir: Path, params, baselines: dict | None = None, data_summary: dict | None = None) -> dict:
    """{"sample_efficiency": {variant: {n: result}}, "sample_efficiency_baselines": {name: {n: ...}},
    "depth": {(cut, k): result}, "depth_answer": ..., "depth_baselines": ...} for the sizes, cuts and depths in
    params whose results exist. A result is `results.read_strategy(folder, name)` plus `correct` (seeds x
    test images, 0/1) and its `interval`; `baselines` are the main comparison's (`results.read_baselines`);
    `data_summary` (the prepared data's) gives the FLOP account of the depth answer."""
    out: dict = {}
    sample_dir = Path(studies_dir) / "sample_efficiency"
    sizes = sorted(params.studies.sample_efficiency.train_per_class)
    sample = {}
    for variant in params.variants:
        found = {}
        for n in sizes:
            if (sample_dir / variant / f"n{n}" / "seeds").is_dir():
                found[n] = _with_correct(read_strategy(sample_dir / variant, f"n{n}"), sample_dir / variant, f"n{n}")
        if found:
            sample[variant] = found
    if sample:
        out["sample_efficiency"] = sample
        out["sample_efficiency_baselines"] = _read_sample_baselines(sample_dir / "baselines", sizes, sample)
        if data_summary:
            out["sample_efficiency_answers"] = sample_answers(
                params, sample_dir, sample, out["sample_efficiency_baselines"], data_summary
            )
    depth_dir = Path(studies_dir) / "depth"
    depth = {}
    layout = cost.layout_of(data_summary, params.model.pooling) if data_summary else None
    settings = params.studies.depth
    for cut in settings.cut_after:
        for k in sorted(settings.k):
            train_dir, tune_dir = depth_dir / "train" / cut, depth_dir / "tune" / cut
            if (train_dir / f"top{k}" / "seeds").is_dir():
                result = read_strategy(train_dir, f"top{k}")
                evidence = read_evidence(train_dir, tune_dir, f"top{k}")
                kept = kept_layers(cut)
                result["evidence"] = with_flops(evidence, frozenset(kept[len(kept) - k :]), layout)
                result["correct"] = result["evidence"]["correct"]
                result["interval"] = accuracy_interval(result["correct"])
                depth[cut, k] = result
    if depth:
        out["depth"] = depth
        labels = next(iter(depth.values()))["evidence"]["labels"]
        out["depth_baselines"] = {
            name: b for name, b in (baselines or {}).items() if np.array_equal(b["labels"], labels)
        }
        if len(depth) > 1:
            out["depth_answer"] = choose(
                {settings.variant_name(cut, k): r["evidence"] for (cut, k), r in depth.items()},
                params.report.margin,
                baseline_evidence(out["depth_baselines"], layout),
            )
    return out


def sample_answers(params, sample_dir: Path, sample: dict, baselines: dict, data_summary: dict) -> dict[int, dict]:
    """{n: the main answer's rule applied at n images per class}: the strategies trained at n (their
    hyperparameters tuned once on the main comparison: cost = one training run + extraction) and
    the baselines fitted on each seed's very subset, at the sizes where at least two strategies ran."""
    layout = cost.layout_of(data_summary, params.model.pooling)
    answers = {}
    for n in sorted({n for by_size in sample.values() for n in by_size}):
        evidence = {
            v: with_flops(
                read_evidence(sample_dir / v, None, f"n{n}"),
                params.variant(v).layers,
                layout,
                params.variant(v).parameters,
            )
            for v, by_size in sample.items()
            if n in by_size
        }
        if len(evidence) < 2:
            continue
        references = {name: by_size[n] for name, by_size in baselines.items() if n in by_size}
        answers[n] = choose(evidence, params.report.margin, baseline_evidence(references, layout))
    return answers


def sample_answer_table(answers: dict[int, dict]) -> tuple[list[str], list[list[str]]]:
    """Per size: best on validation, what is shown non-inferior to it (one-sided 95% lower bound),
    the recommendation, and what could not be shown either way."""
    headers = ["n per class", "best on validation", "non-inferior within the margin", "recommended", "inconclusive"]
    rows = []
    for n, answer in answers.items():
        comparisons = answer["comparisons"]
        others = [v for v in answer["candidates"] if v != answer["best_on_validation"]]
        open_ = [v for v, c in comparisons.items() if c["verdict"] == "inconclusive"]
        rows.append(
            [
                str(n),
                f"`{answer['best_on_validation']}`",
                ", ".join(f"{_label(v)} ({comparisons[v]['lower_bound']:+.3f})" for v in others) or "none",
                _label(answer["recommended"]),
                ", ".join(f"{_label(v)} (loss up to {-comparisons[v]['lower_bound']:.3f})" for v in open_) or "none",
            ]
        )
    return headers, rows


def _label(name: str) -> str:
    return BASELINE_NAMES.get(name, f"`{name}`")


def _with_correct(result: dict, train_dir: Path, name: str) -> dict:
    result["labels"], result["correct"] = read_test_correct(train_dir, name)
    result["interval"] = accuracy_interval(result["correct"])
    return result


def _read_sample_baselines(folder: Path, sizes: list[int], sample: dict) -> dict:
    """{baseline: {n: {"correct", "interval", "C" per seed}}} for the sizes whose baselines stage
    ran; a DataError when they predicted another test set than the study's strategies."""
    labels = next(iter(next(iter(sample.values())).values()))["labels"]
    out: dict = {}
    for n in sizes:
        for name, found in (read_sample_baselines(folder, n) or {}).items():
            if not np.array_equal(found["labels"], labels):
                raise DataError(
                    f"{folder / f'n{n}'}: {name} was computed on another test set than the study's "
                    f"strategies; rerun `dvc repro sample_efficiency_baselines@{n}`"
                )
            correct = found["correct"]
            out.setdefault(name, {})[n] = {
                "correct": correct,
                "interval": accuracy_interval(correct),
                "C": found["C"],
                "records": found["records"],
            }
    return out


# --- sample efficiency ------------------------------------------------------------------------


def sample_efficiency_figure(sample: dict, baselines: dict, palette: dict) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 5))
    for variant, by_size in sample.items():
        sizes = sorted(by_size)
        intervals = [by_size[n]["interval"] for n in sizes]
        axes.plot(sizes, [i.mean for i in intervals], marker="o", color=palette[variant], label=variant)
        axes.fill_between(
            sizes,
            [max(0, i.low) for i in intervals],
            [min(1, i.high) for i in intervals],
            color=palette[variant],
            alpha=0.15,
        )
    for name, by_size in baselines.items():
        colour, style, label = BASELINE_STYLE.get(name, ("grey", "-.", name))
        sizes = sorted(by_size)
        axes.plot(
            sizes,
            [by_size[n]["interval"].mean for n in sizes],
            style,
            marker="x",
            color=colour,
            label=f"reference: {label}",
        )
    axes.set_xscale("log")
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.minorticks_off()
    axes.set_xlabel("training images per class (log scale)")
    axes.set_ylabel("test accuracy")
    axes.grid(alpha=0.3)
    axes.legend(title="strategy", fontsize=8)
    axes.set_title("Sample efficiency: mean over seeds, band = 95% interval (seeds and test images)")
    figure.tight_layout()
    return figure


def advantage_table(sample: dict, reference: dict, exclude: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Per strategy: its test accuracy minus the reference's at every size (`reference`: {n: seeds x
    images 0/1}), paired on the test images, with the 95% interval over seeds and images; and
    where a significant advantage (interval above 0) vanishes."""
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    headers = ["strategy", *[f"Δ at n={n}" for n in sizes], "significant advantage vanishes at"]
    rows = []
    for variant, by_size in sample.items():
        if variant == exclude:
            continue
        cells, significant = [], {}
        for n in sizes:
            if n not in by_size or n not in reference:
                cells.append("—")
                continue
            d = difference_interval(by_size[n]["correct"], reference[n])
            significant[n] = d.low > 0
            cells.append(signed_interval(d))
        rows.append([f"**{variant}**", *cells, _vanishing_point(significant)])
    return headers, rows


def _vanishing_point(significant: dict[int, bool]) -> str:
    if not significant:
        return "—"
    sizes = sorted(significant)
    if not any(significant.values()):
        return f"no significant advantage at any size ({sizes[0]}–{sizes[-1]})"
    last = max(n for n in sizes if significant[n])
    if last == sizes[-1]:
        gaps = [str(n) for n in sizes if not significant[n]]  # smaller sizes where it is not (yet) significant
        return f"does not vanish within {sizes[0]}–{sizes[-1]} per class" + (
            f" (not significant at n = {', '.join(gaps)})" if gaps else ""
        )
    after = sizes[sizes.index(last) + 1]
    return f"n = {after} per class (last significant at n = {last})"


def sample_efficiency_table(sample: dict, baselines: dict) -> tuple[list[str], list[list[str]]]:
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    headers = ["strategy", *[f"n={n}" for n in sizes], "unconverged runs"]
    rows = [
        [
            f"**{v}**",
            *[_cell(s[n]["interval"]) if n in s else "—" for n in sizes],
            str(sum(len(unconverged(r)) for r in s.values())),
        ]
        for v, s in sample.items()
    ]
    for name, by_size in baselines.items():
        cells = [_cell(by_size[n]["interval"]) if n in by_size else "—" for n in sizes]
        rows.append([f"*reference: {BASELINE_NAMES.get(name, name)}*", *cells, "–"])
    return headers, rows


# --- freezing depth ---------------------------------------------------------------------------

BLOCK_STARTS = {  # k at which the top k layers first cover a whole block (block boundaries)
    block: len(CONV_LAYERS) - CONV_LAYERS.index(layers[0]) for block, layers in BLOCKS.items()
}


def _cuts(depth: dict) -> list[str]:
    return sorted({cut for cut, _ in depth}, key=list(BLOCKS).index)


def _depth_label(cut: str, k: int) -> str:
    return f"k = {k}" if cut == FULL_BASE else f"cut after {cut}, k = {k}"


def depth_figure(depth: dict, baselines: dict) -> plt.Figure:
    """Test accuracy (95% interval) and trainable parameters against k, one line per cut point."""
    figure, (acc_axes, param_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    cuts = _cuts(depth)
    for index, cut in enumerate(cuts):
        ks = sorted(k for c, k in depth if c == cut)
        intervals = [depth[cut, k]["interval"] for k in ks]
        label = "whole base" if cut == FULL_BASE else f"cut after {cut}"
        colour = plt.cm.viridis(index / max(1, len(cuts) - 1)) if len(cuts) > 1 else "tab:blue"
        yerr = [[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]
        acc_axes.errorbar(ks, [i.mean for i in intervals], yerr=yerr, fmt="o-", capsize=4, color=colour, label=label)
        trainable = [depth[cut, k]["parameters"]["trainable"] for k in ks]
        param_axes.plot(ks, trainable, "s-", color=colour, label=label)
    for name, b in baselines.items():
        colour, style, label = BASELINE_STYLE.get(name, ("grey", "-.", name))
        acc_axes.axhline(b["test_accuracy"], color=colour, linestyle=style, label=f"reference: {label}")
    acc_axes.legend(fontsize=8)
    acc_axes.set_ylabel("test accuracy (mean, 95% interval)")
    param_axes.set_yscale("log")
    param_axes.set_ylabel("trainable parameters (log scale)")
    top = max(len(kept_layers(cut)) for cut in cuts)
    for axes in (acc_axes, param_axes):
        axes.set_xlabel("k: top conv layers of the kept base trained (0 = frozen base)")
        axes.set_xticks(range(0, top + 1))
        axes.grid(alpha=0.3)
        if cuts == [FULL_BASE]:
            for block, k in BLOCK_STARTS.items():
                axes.axvline(k, color="black", alpha=0.12, linestyle=":")
                axes.annotate(
                    f"{block}+", (k, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="center", va="bottom"
                )
    figure.suptitle("Freezing depth: accuracy and trainable parameters when the top k conv layers train")
    figure.tight_layout()
    return figure


def cut_depth_heatmap(depth: dict) -> plt.Figure:
    """Cut point (rows) x k (columns), colour and text = mean test accuracy; blank = not run."""
    cuts = _cuts(depth)
    ks = sorted({k for _, k in depth})
    values = np.full((len(cuts), len(ks)), np.nan)
    for (cut, k), result in depth.items():
        values[cuts.index(cut), ks.index(k)] = result["interval"].mean
    figure, axes = plt.subplots(figsize=(1.0 * len(ks) + 3, 0.6 * len(cuts) + 2))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(ks)), [str(k) for k in ks])
    axes.set_yticks(range(len(cuts)), [f"after {cut}" for cut in cuts])
    axes.set_xlabel("k: top conv layers of the kept base trained")
    axes.set_ylabel("base cut")
    middle = np.nanmean(values)
    for (row, col), value in np.ndenumerate(values):
        if not np.isnan(value):
            colour = "black" if value > middle else "white"
            axes.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=9, color=colour)
    figure.colorbar(image, ax=axes, label="test accuracy (mean over seeds)")
    axes.set_title("Cut point x freezing depth: test accuracy")
    figure.tight_layout()
    return figure


def depth_table(depth: dict, baselines: dict) -> tuple[list[str], list[list[str]]]:
    headers = [
        "cut after",
        "k",
        "trains from",
        "trainable parameters",
        "seeds",
        "test accuracy (95% interval)",
        "Δ vs pixels LR",
        "best val accuracy",
        "unconverged runs",
        "head_units",
        "learning rate",
        *[f"drift {b}" for b in BLOCKS],
    ]
    pixels = baselines.get(PIXELS)
    rows = []
    for cut, k in sorted(depth, key=lambda key: (list(BLOCKS).index(key[0]), key[1])):
        r = depth[cut, k]
        kept = kept_layers(cut)
        kept_blocks = list(BLOCKS)[: list(BLOCKS).index(cut) + 1]
        first = kept[len(kept) - k] if k else "(head only)"
        drift = mean_drift(r)
        versus = signed_interval(difference_interval(r["correct"], pixels["correct"])) if pixels else "—"
        rows.append(
            [
                cut,
                str(k),
                first,
                f"{r['parameters']['trainable']:,}",
                str(r["interval"].n),
                _cell(r["interval"]),
                versus,
                f"{r['evidence']['val_accuracy']:.3f}",
                str(len(unconverged(r))),
                str(r["head_units"]),
                f"{r['learning_rate']:.2g}",
                *[drift_text(drift[b]) if b in kept_blocks else "removed" for b in BLOCKS],
            ]
        )
    for name, b in baselines.items():
        cells = {
            "cut after": f"*reference: {BASELINE_NAMES.get(name, name)}*",
            "test accuracy (95% interval)": f"{b['test_accuracy']:.3f} (deterministic)",
            "best val accuracy": f"{b['val_accuracy']:.3f}",
        }
        rows.append([cells.get(h, "") for h in headers])
    return headers, rows


def depth_name(variant: str) -> str:
    """A depth strategy's or baseline's name as the text says it: `top3` -> "k = 3",
    `block3_top2` -> "cut after block3, k = 2"."""
    head, _, k = variant.rpartition("top")
    if k.isdigit() and head in ("", *(f"{block}_" for block in BLOCKS)):
        return _depth_label(head.rstrip("_") or FULL_BASE, int(k))
    return BASELINE_NAMES.get(variant, variant)


# --- figures and document blocks ----------------------------------------------------------------


def draw(studies: dict, palette: dict) -> dict:
    """{figure id: drawing function} for every study whose results exist."""
    drawings = {}
    if "sample_efficiency" in studies:
        sample, references = studies["sample_efficiency"], studies["sample_efficiency_baselines"]
        drawings["sample_efficiency"] = lambda: sample_efficiency_figure(sample, references, palette)
    if "depth" in studies:
        depth = studies["depth"]
        drawings["depth"] = lambda: depth_figure(depth, studies["depth_baselines"])
        if len(_cuts(depth)) > 1:
            drawings["cut_depth"] = lambda: cut_depth_heatmap(depth)
        order = sorted(depth, key=lambda key: (list(BLOCKS).index(key[0]), key[1]))
        drawings["depth_drift"] = lambda: drift_heatmap(
            {_depth_label(cut, k): mean_drift(depth[cut, k]) for cut, k in order},
            "Freezing depth: final weight drift per block",
            "top k layers trained",
        )
    return drawings


STUDY_INTERVALS = (
    "Intervals are the main comparison's: 95% over training seeds and test images, differences paired on "
    "the test images and (conservatively) independent over seeds."
)


def study_blocks(params, studies: dict, files: dict) -> list[tuple]:
    """The studies' sections, for the studies that ran."""
    doc: list[tuple] = []
    if "sample_efficiency" in studies:
        doc += _sample_efficiency_blocks(params, studies, files)
    if "depth" in studies:
        doc += _depth_blocks(params, studies, files)
    return doc


def _sample_efficiency_blocks(params, studies: dict, files: dict) -> list[tuple]:
    sample, references = studies["sample_efficiency"], studies["sample_efficiency_baselines"]
    doc: list[tuple] = [
        ("h2", "Study: sample efficiency"),
        (
            "p",
            f"Test accuracy as the training set grows: each strategy retrained on n images per class "
            f"(nested subsets of one pool; seeds {list(params.studies.sample_efficiency.seeds)}, each seed with its "
            f"own draw of the subset), under the training rule (up to {params.train.max_epochs} epochs, early "
            "stopping), with the hyperparameters tuned on the main comparison's "
            f"{params.data.train_per_class} per class. Validation and test sets are the same for every n. "
            "The reference rows are the two baselines fitted on each seed's very subset. " + STUDY_INTERVALS,
        ),
        ("figure", files["sample_efficiency"], "Test accuracy vs images per class (log scale), 95% bands."),
        ("table", *sample_efficiency_table(sample, references)),
    ]
    if studies.get("sample_efficiency_answers"):
        doc += [
            ("h3", "The answer at each size"),
            (
                "p",
                "The main comparison's rule at every n: the best strategy on validation, the strategies and "
                f"baselines shown non-inferior to it within {params.report.margin:g} (one-sided 95% lower "
                "bound of the difference, seeds and test images), and the cheapest of those in training FLOPs "
                "(one training run + feature extraction: the hyperparameters come from the main tuning). "
                "Inconclusive: neither shown non-inferior nor shown worse.",
            ),
            ("table", *sample_answer_table(studies["sample_efficiency_answers"])),
        ]
    return doc + _sample_advantage_blocks(params.report.baseline, sample, references)


def _sample_advantage_blocks(baseline: str, sample: dict, references: dict) -> list[tuple]:
    """Each size's differences against the pixel baseline and against `report.baseline`."""
    doc: list[tuple] = []
    if PIXELS in references:
        reference = {n: b["correct"] for n, b in references[PIXELS].items()}
        doc += [
            ("h3", "Against the pixel baseline"),
            (
                "p",
                "Δ = test accuracy minus that of logistic regression on the pixels of the same training "
                "images (same seeds, same subsets), mean and 95% interval. Where the interval contains 0 "
                "the strategy is not shown to beat a linear model on raw pixels.",
            ),
            ("table", *advantage_table(sample, reference)),
        ]
    if baseline in sample:
        reference = {n: r["correct"] for n, r in sample[baseline].items()}
        doc += [
            ("h3", f"Where the advantage over {baseline} vanishes"),
            (
                "p",
                f"Δ = test accuracy minus that of `{baseline}` (same seeds, same subsets), mean and 95% "
                "interval. An advantage is significant where the interval lies above 0.",
            ),
            ("table", *advantage_table(sample, reference, exclude=baseline)),
        ]
    return doc


def _depth_blocks(params, studies: dict, files: dict) -> list[tuple]:
    depth = studies["depth"]
    seeds = sorted({s for r in depth.values() for s in r["evidence"]["seeds"]})
    cuts = _cuts(depth)
    where = (
        "of VGG16's 13 conv layers (k = 0: frozen base, k = 13: full fine-tuning)"
        if cuts == [FULL_BASE]
        else "of the conv layers the base keeps when it is cut after "
        + ", ".join(cuts)
        + " (the blocks above the cut removed; k = 0: the kept base frozen)"
    )
    doc: list[tuple] = [
        ("h2", "Study: freezing depth" + ("" if cuts == [FULL_BASE] else " and cut point")),
        (
            "p",
            f"The transferability curve: train the top k {where}, every cell tuned with the same Optuna "
            f"budget as the strategies (`tune.n_trials` = {params.tune.n_trials} trials) "
            f"and trained under the training rule (up to {params.train.max_epochs} epochs) with seeds "
            f"{seeds}. Reference lines: the main comparison's baselines on the same data. "
            + ("Dotted lines: where k first covers a whole block. " if cuts == [FULL_BASE] else "")
            + STUDY_INTERVALS,
        ),
    ]
    if "depth_answer" in studies:
        doc += [
            ("p", "The main answer's rule applied to the depths:"),
            ("list", rule_lines(studies["depth_answer"], depth_name)),
        ]
    doc += [("figure", files["depth"], "Test accuracy and trainable parameters vs k.")]
    if "cut_depth" in files:
        doc += [("figure", files["cut_depth"], "Mean test accuracy over cut point and k (intervals in the table).")]
    doc += [
        ("table", *depth_table(depth, studies["depth_baselines"])),
        ("figure", files["depth_drift"], "Final weight drift per block for every k."),
    ]
    return doc
