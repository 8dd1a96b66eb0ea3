"""The answer to "how much should I freeze?", chosen on validation.

The rule (the report and the register stage both use it, on `results.read_evidence` of every
strategy):
  1. best_on_validation: the strategy with the highest mean best-validation accuracy over its
     seeds (ties: fewer trainable parameters, then the name). Test accuracy plays no part.
  2. indistinguishable_from_best: the strategies whose test accuracy minus the best's has a 95%
     interval (seeds and test images, paired on images; `pipeline.stats.difference_interval`)
     that contains 0.
  3. recommended: among the best and those, the cheapest in measured compute: the seconds its
     tuning trials trained, plus one training run (mean over seeds), plus the one-time feature
     extraction its cached path needs.
"""

from __future__ import annotations

from pipeline.errors import DataError
from pipeline.stats import difference_interval


def choose(evidence: dict[str, dict]) -> dict:
    """The answer from {strategy: results.read_evidence(...)}; see the module docstring for the rule."""
    if not evidence:
        raise DataError("no strategy results to choose from; run the train stages first")
    best = max(evidence, key=lambda v: (evidence[v]["val_accuracy"], -evidence[v]["params_trainable"], v))
    reference = evidence[best]["correct"]
    differences = {v: difference_interval(e["correct"], reference) for v, e in evidence.items() if v != best}
    tied = [v for v, d in differences.items() if d.low <= 0 <= d.high]
    candidates = [best, *tied]
    recommended = min(candidates, key=lambda v: (evidence[v]["compute_seconds"], v))
    cost = {v: evidence[v]["compute_seconds"] for v in evidence}
    return {
        "best_on_validation": best,
        "indistinguishable_from_best": sorted(tied),
        "recommended": recommended,
        "compute_seconds": cost,
        "recommended_cost_ratio": cost[recommended] / cost[best] if cost[best] else 1.0,
        "differences_from_best": {
            v: {"mean": d.mean, "ci95_low": d.low, "ci95_high": d.high} for v, d in differences.items()
        },
        "rule": "best mean validation accuracy; strategies whose test-accuracy difference from it has a 95% "
        "interval (seeds and test images, paired on images) containing 0; the cheapest of those in measured "
        "compute (tuning + one training run + feature extraction)",
    }
