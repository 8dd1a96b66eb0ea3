"""The report's study sections: sample efficiency and freezing depth.

Each section appears when its results exist: `read_studies` returns only what was run for the
current params, `draw` lists its figures and `study_blocks` writes the text and tables (the
block format of `pipeline.report_document`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.figures import plt
from pipeline.report_diagnostics import drift_heatmap, drift_text, mean_ci, mean_drift
from pipeline.stats import paired_t_test, t_interval
from pipeline.vgg16 import BLOCKS, CONV_LAYERS


def read_studies(studies_dir: Path, params, read_variant) -> dict:
    """{"sample_efficiency": {variant: {n: result}}, "depth": {k: result}} for the sizes and depths
    in params whose results exist (`read_variant(folder, name)` reads one result folder)."""
    out: dict = {}
    sample = {}
    for variant in params.variants:
        found = {}
        for n in sorted(params.studies.sample_efficiency.train_per_class):
            folder = studies_dir / "sample_efficiency" / variant
            if (folder / f"n{n}" / "seeds").is_dir():
                found[n] = read_variant(folder, f"n{n}")
        if found:
            sample[variant] = found
    if sample:
        out["sample_efficiency"] = sample
    depth = {}
    for k in sorted(params.studies.depth.k):
        folder = studies_dir / "depth" / "train"
        if (folder / f"top{k}" / "seeds").is_dir():
            depth[k] = read_variant(folder, f"top{k}")
    if depth:
        out["depth"] = depth
    return out


# --- sample efficiency ------------------------------------------------------------------------


def sample_efficiency_figure(sample: dict, palette: dict) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 5))
    for variant, by_size in sample.items():
        sizes = sorted(by_size)
        intervals = [t_interval(list(by_size[n]["test_accuracy"].values())) for n in sizes]
        axes.plot(sizes, [i.mean for i in intervals], marker="o", color=palette[variant], label=variant)
        if all(i.low is not None for i in intervals):
            axes.fill_between(sizes, [max(0, i.low) for i in intervals], [min(1, i.high) for i in intervals],
                              color=palette[variant], alpha=0.15)  # fmt: skip
    axes.set_xscale("log")
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.minorticks_off()
    axes.set_xlabel("training images per class (log scale)")
    axes.set_ylabel("test accuracy")
    axes.grid(alpha=0.3)
    axes.legend(title="strategy")
    axes.set_title("Sample efficiency: mean over seeds, band = 95% confidence interval")
    figure.tight_layout()
    return figure


def advantage_table(sample: dict, baseline: str) -> tuple[list[str], list[list[str]]]:
    """Per strategy: paired accuracy difference to `baseline` at every size, and where the
    advantage vanishes: the smallest size from which on no larger size shows a significant
    advantage (95% CI of the paired difference above 0)."""
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    headers = ["strategy", *[f"Δ at n={n}" for n in sizes], "significant advantage vanishes at"]
    rows = []
    for variant, by_size in sample.items():
        if variant == baseline or baseline not in sample:
            continue
        cells, significant = [], {}
        for n in sizes:
            if n not in by_size or n not in sample[baseline]:
                cells.append("—")
                continue
            d = paired_t_test(by_size[n]["test_accuracy"], sample[baseline][n]["test_accuracy"]).difference
            significant[n] = d.low is not None and d.low > 0
            cells.append(f"{d.mean:+.3f}" + ("" if d.low is None else f" [{d.low:+.3f}, {d.high:+.3f}]"))
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
        return f"does not vanish within {sizes[0]}–{sizes[-1]} per class"
    after = sizes[sizes.index(last) + 1]
    return f"n = {after} per class (last significant at n = {last})"


def sample_efficiency_table(sample: dict) -> tuple[list[str], list[list[str]]]:
    sizes = sorted({n for by_size in sample.values() for n in by_size})
    headers = ["strategy", *[f"n={n}" for n in sizes]]
    rows = [
        [f"**{v}**", *[mean_ci(list(s[n]["test_accuracy"].values())) if n in s else "—" for n in sizes]]
        for v, s in sample.items()
    ]
    return headers, rows


# --- freezing depth ---------------------------------------------------------------------------

BLOCK_STARTS = {  # k at which the top k layers first cover a whole block (block boundaries)
    block: len(CONV_LAYERS) - CONV_LAYERS.index(layers[0]) for block, layers in BLOCKS.items()
}


def depth_figure(depth: dict) -> plt.Figure:
    ks = sorted(depth)
    intervals = [t_interval(list(depth[k]["test_accuracy"].values())) for k in ks]
    trainable = [depth[k]["parameters"]["trainable"] for k in ks]
    figure, (acc_axes, param_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    yerr = None
    if all(i.low is not None for i in intervals):
        yerr = [[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]
    acc_axes.errorbar(ks, [i.mean for i in intervals], yerr=yerr, fmt="o-", capsize=4, color="tab:blue")
    acc_axes.set_ylabel("test accuracy (mean, 95% CI)")
    param_axes.plot(ks, trainable, "s-", color="tab:grey")
    param_axes.set_yscale("log")
    param_axes.set_ylabel("trainable parameters (log scale)")
    for axes in (acc_axes, param_axes):
        axes.set_xlabel("k: top conv layers trained (0 = frozen base, 13 = full fine-tuning)")
        axes.set_xticks(range(0, len(CONV_LAYERS) + 1))
        axes.grid(alpha=0.3)
        for block, k in BLOCK_STARTS.items():
            axes.axvline(k, color="black", alpha=0.12, linestyle=":")
            axes.annotate(f"{block}+", (k, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="center",
                          va="bottom", alpha=0.6)  # fmt: skip
    figure.suptitle("Freezing depth: accuracy and trainable parameters when the top k conv layers train")
    figure.tight_layout()
    return figure


def depth_table(depth: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["k", "trains from", "trainable parameters", "test accuracy (mean ± 95% CI)", "head_units",
               "learning rate", *[f"drift {b}" for b in BLOCKS]]  # fmt: skip
    rows = []
    for k in sorted(depth):
        r = depth[k]
        first = CONV_LAYERS[len(CONV_LAYERS) - k] if k else "(head only)"
        drift = mean_drift(r)
        accuracy = mean_ci(list(r["test_accuracy"].values()))
        rows.append([str(k), first, f"{r['parameters']['trainable']:,}", accuracy, str(r["head_units"]),
                     f"{r['learning_rate']:.2g}", *[drift_text(drift[b]) for b in BLOCKS]])  # fmt: skip
    return headers, rows


# --- figures and document blocks ----------------------------------------------------------------


def draw(studies: dict, palette: dict) -> dict:
    """{figure id: drawing function} for every study whose results exist."""
    drawings = {}
    if "sample_efficiency" in studies:
        drawings["sample_efficiency"] = lambda: sample_efficiency_figure(studies["sample_efficiency"], palette)
    if "depth" in studies:
        depth = studies["depth"]
        drawings["depth"] = lambda: depth_figure(depth)
        drawings["depth_drift"] = lambda: drift_heatmap(
            {f"k={k}": mean_drift(depth[k]) for k in sorted(depth)},
            "Freezing depth: final weight drift per block", "top k layers trained")  # fmt: skip
    return drawings


def study_blocks(params, studies: dict, files: dict) -> list[tuple]:
    doc: list[tuple] = []
    if "sample_efficiency" in studies:
        sample = studies["sample_efficiency"]
        seeds = list(params.studies.sample_efficiency.seeds)
        baseline = params.report.baseline
        doc += [
            ("h2", "Study: sample efficiency"),
            ("p", f"Test accuracy as the training set grows: each strategy retrained on n images per class "
                  f"(nested subsets of one pool; seeds {seeds}, each seed with its own draw of the subset), "
                  f"the training rule (up to {params.train.max_epochs} epochs, early stopping), with the "
                  "hyperparameters tuned on the main comparison's "
                  f"{params.data.train_per_class} per class. Validation and test sets are the same for every n."),
            ("figure", files["sample_efficiency"], "Test accuracy vs images per class (log scale), 95% CI bands."),
            ("table", *sample_efficiency_table(sample)),
            ("h3", f"Where the advantage over {baseline} vanishes"),
            ("p", f"Δ = paired difference in test accuracy to `{baseline}` (same seeds, same subsets), mean and "
                  "95% CI. An advantage is significant where the interval lies above 0."),
            ("table", *advantage_table(sample, baseline)),
        ]  # fmt: skip
    if "depth" in studies:
        doc += [
            ("h2", "Study: freezing depth"),
            ("p", "The transferability curve: train the top k of VGG16's 13 conv layers (k = 0: frozen base, "
                  "k = 13: full fine-tuning), every k tuned with the same Optuna budget as the strategies and "
                  f"trained under the training rule (up to {params.train.max_epochs} epochs) with seeds "
                  f"{list(params.studies.depth.seeds)}. Dotted "
                  "lines: where k first covers a whole block."),
            ("figure", files["depth"], "Test accuracy and trainable parameters vs k."),
            ("table", *depth_table(studies["depth"])),
            ("figure", files["depth_drift"], "Final weight drift per block for every k."),
        ]  # fmt: skip
    return doc
