"""The answer to "how much should I freeze?": the cheapest strategy shown non-inferior to the best.

The rule (the report, the register stage and the studies all use it):
  1. best_on_validation: the network strategy with the highest mean best-validation accuracy
     over its seeds (ties: fewer trainable parameters, then the name). Test accuracy plays no part.
  2. candidates: the best, and every other strategy or reference baseline whose test accuracy
     minus the best's has a one-sided 95% lower bound (seeds and test images, paired on the
     images; `pipeline.core.stats.noninferiority`) above -margin: a loss of `margin` or more is ruled
     out. A strategy that is neither shown non-inferior nor shown worse is "inconclusive" and is
     not a candidate: not significantly different is not as accurate.
  3. recommended: the cheapest candidate in training FLOPs (`pipeline.analysis.cost`: every tune trial,
     one training run, the one-time feature extraction), a unit that reruns identically.
     recommended_network: the same among the network strategies only (what register registers);
     when a baseline is recommended, training VGG16 does not pay off on this data.
Measured seconds are reported beside the FLOPs as a machine-dependent column; they decide nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis import cost
from pipeline.core.results import read_evidence
from pipeline.core.stats import noninferiority
from pipeline.runtime.errors import DataError

RULE = (
    "best mean validation accuracy among the networks; candidates: it and every strategy or baseline whose "
    "test-accuracy difference from it has a one-sided 95% lower bound (seeds and test images, paired on images) "
    "above -margin; recommended: the cheapest candidate in training FLOPs (tuning + one training run + feature "
    "extraction)"
)


def choose(evidence: dict[str, dict], margin: float, baselines: dict[str, dict] | None = None) -> dict:
    """The answer from {strategy: evidence} and optional {baseline: evidence}, each evidence a dict
    with "correct" (seeds x test images 0/1, the same images in the same order) and "flops" (its
    total cost); strategies also need "val_accuracy" and "params_trainable". Raises DataError
    without strategies. See the module docstring for the rule."""
    if not evidence:
        raise DataError("no strategy results to choose from; run the train stages first")
    baselines = baselines or {}
    clash = set(evidence) & set(baselines)
    if clash:
        raise DataError(f"strategy and baseline share a name: {sorted(clash)}; rename the strategy in params.yaml")
    best = max(evidence, key=lambda v: (evidence[v]["val_accuracy"], -evidence[v]["params_trainable"], v))
    reference = evidence[best]["correct"]
    everything = {**evidence, **baselines}
    comparisons = {
        name: noninferiority(e["correct"], reference, margin) for name, e in everything.items() if name != best
    }
    candidates = [best, *(name for name, c in comparisons.items() if c.non_inferior)]
    cost = {name: float(e["flops"]) for name, e in everything.items()}

    def cheapest(names):
        return min(names, key=lambda name: (cost[name], name))

    recommended = cheapest(candidates)
    return {
        "margin": margin,
        "best_on_validation": best,
        "candidates": {
            name: {"lower_bound": None if name == best else comparisons[name].lower, "flops": cost[name]}
            for name in candidates
        },
        "baselines_non_inferior": [name for name in baselines if name in candidates],
        "recommended": recommended,
        "recommended_network": cheapest([name for name in candidates if name in evidence]),
        "cheaper_than_best": cost[best] / cost[recommended] if cost[recommended] else 1.0,
        "flops": cost,
        "comparisons": {
            name: {"mean": c.mean, "lower_bound": c.lower, "upper_bound": c.upper, "verdict": c.verdict}
            for name, c in comparisons.items()
        },
        "rule": RULE,
    }


def describe(name: str, comparison: dict, margin: float) -> str:
    """What the statistics allow us to say of `name` against the best, in words that follow them:
    'non-inferior within 0.010', 'significantly worse (by at least 0.012)', or 'cannot rule out a
    loss of up to 0.050'."""
    if comparison["lower_bound"] > -margin:
        return f"non-inferior within {margin:.3f} (loss at most {max(0.0, -comparison['lower_bound']):.3f})"
    if comparison["verdict"] == "worse":
        return f"significantly worse (by at least {-comparison['upper_bound']:.3f})"
    return f"not shown non-inferior: cannot rule out a loss of up to {-comparison['lower_bound']:.3f}"


def with_flops(evidence: dict, trainable: frozenset[str], layout, parameters: str = "all") -> dict:
    """A strategy's evidence (`results.read_evidence`) with its cost in FLOPs: "flops_parts"
    (`cost.strategy_flops`) and "flops" (their total)."""
    parts = cost.strategy_flops(evidence["runs"], evidence["trials"], trainable, layout, parameters)
    return {**evidence, "flops_parts": parts, "flops": parts["total"]}


def baseline_flops(name: str, record: dict, layout) -> float:
    """A baseline's FLOPs from its record (the baselines stage's metrics.json entry): the logistic
    regressions' L-BFGS iterations over the C grid, plus the probe's forward pass of the conv base.
    DataError when the record predates the FLOP account."""
    if "iterations" not in record:
        raise DataError(f"baseline {name} has no FLOP account (written by older code); rerun its baselines stage")
    images = record["train_images"] + layout.val_images + layout.test_images
    flops = cost.baseline_flops(
        record["train_images"], layout.val_images, layout.test_images, record["dimensions"], layout.num_classes,
        record["iterations"],
    )  # fmt: skip
    return flops + (cost.prefix_flops("block5_pool", images, layout) if record.get("conv_base_features") else 0.0)


def baseline_evidence(baselines: dict, layout) -> dict[str, dict]:
    """{baseline: {"correct", "flops"}} from `results.read_baselines` (a record per baseline) or
    `results.read_sample_baselines` (records per seed: their mean cost)."""
    out = {}
    for name, b in baselines.items():
        records = list(b["records"].values()) if "records" in b else [b]
        flops = float(np.mean([baseline_flops(name, record, layout) for record in records]))
        out[name] = {"correct": b["correct"], "flops": flops}
    return out


def read_inputs(params, data_summary: dict, train_dir: Path, tune_dir: Path, baselines: dict) -> tuple[dict, dict]:
    """(strategy evidence with FLOPs, baseline evidence) for `choose`, from the stages' files
    (`baselines`: `results.read_baselines`). Every comparison is paired on test images: a DataError
    names the fix when the baselines predicted another test set than the strategies."""
    layout = cost.layout_of(data_summary, params.model.pooling)
    evidence = {
        v: with_flops(
            read_evidence(train_dir, tune_dir, v), params.variant(v).layers, layout, params.variant(v).parameters
        )
        for v in params.variants
    }
    labels = next(iter(evidence.values()))["labels"]
    for name, baseline in baselines.items():
        if not np.array_equal(baseline["labels"], labels):
            raise DataError(
                f"baseline {name} was computed on another test set ({len(baseline['labels'])} images, the "
                f"strategies have {len(labels)}); rerun `dvc repro baselines`"
            )
    return evidence, baseline_evidence(baselines, layout)
