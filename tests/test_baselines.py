"""The baselines stage: logistic regression on pixels and a convex probe on the frozen features,
regularisation chosen on validation, per-image predictions, MLflow runs tagged as baselines."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.stages import baselines
from pipeline.stages.baselines import C_GRID, PIXELS, PROBE, TOL, fit, fit_logistic_regression, reorder_stability
from tests.conftest import REPO, cli, make_tiny_project, run_stage, stage_env


def test_regularisation_is_chosen_on_validation_loss_not_on_test():
    """Two classes that differ in one of 50 noisy dimensions, with few training images: strong
    regularisation generalises; the choice must follow validation log-loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)

    def split(n):
        labels = np.repeat([0, 1], n)
        x = rng.normal(size=(2 * n, 50))
        x[:, 0] += 1.5 * labels
        return x, labels

    train, val, test = split(10), split(200), split(200)
    predict, record = fit_logistic_regression(train, val)
    losses = {
        c: log_loss(val[1], LogisticRegression(C=c, max_iter=5000, tol=TOL).fit(*train).predict_proba(val[0]))
        for c in C_GRID
    }
    assert record["C"] == min(losses, key=losses.get) and record["C_grid"] == list(C_GRID) and record["tol"] == TOL
    assert record["val_loss"] == pytest.approx(min(losses.values()))
    assert record["C"] < max(C_GRID)  # the weakest regularisation over-fits 20 images in 50 dimensions
    assert np.mean(predict(test[0]).argmax(axis=1) == test[1]) > 0.6  # chance: 0.5, Bayes: 0.77


def test_a_training_subset_fits_as_if_the_data_held_only_those_rows(tmp_path):
    """The sample-efficiency baselines train on a seed's rows of the pool: the same records and
    probabilities as on data cut down to those rows beforehand (the probe standardised with the
    statistics of the rows it trains on, not of the pool)."""
    from pipeline.core.params import load_params

    params = load_params(REPO / "params.yaml")
    rng = np.random.default_rng(1)
    labels = {
        "train": np.repeat(np.arange(3), 20),
        "val": np.repeat(np.arange(3), 10),
        "test": np.repeat(np.arange(3), 10),
    }
    x = {name: {s: rng.normal(size=(len(y), 6)) + y[:, None] for s, y in labels.items()} for name in (PIXELS, PROBE)}
    for name in x:
        x[name]["train"][:30] += 5.0  # rows outside the subset shift the pool's statistics
    splits = {s: (np.zeros((len(y), 1)), y) for s, y in labels.items()}
    rows = np.sort(np.concatenate([np.flatnonzero(labels["train"] == c)[-4:] for c in range(3)]))
    records, probabilities = fit(params, x, splits, ["a", "b", "c"], rows)
    cut_x = {name: {**values, "train": values["train"][rows]} for name, values in x.items()}
    cut_splits = {**splits, "train": (splits["train"][0][rows], labels["train"][rows])}
    cut_records, cut_probabilities = fit(params, cut_x, cut_splits, ["a", "b", "c"])
    assert records == cut_records and records[PROBE]["train_images"] == 12
    for name in x:
        np.testing.assert_array_equal(probabilities[name], cut_probabilities[name])


def test_reorder_stability_counts_the_test_predictions_a_reordered_solve_changes(monkeypatch):
    """Well-separated classes: the optimum's predictions do not depend on the row order (0
    changed). A solver whose answer depends on the row order (here: predicts the first row's
    label) is caught, and the count is over the test images."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 30)
    x = rng.normal(size=(90, 4)) + 4.0 * np.eye(3, 4)[y]
    test = rng.normal(size=(40, 4)) + 4.0 * np.eye(3, 4)[np.repeat([0, 1, 2, 0], 10)]
    stable = reorder_stability((x, y), 1.0, test)
    assert stable == {"reorderings": 2, "max_changed_predictions": 0, "max_accuracy_change": 0.0}

    class FirstRow:
        def __init__(self, label):
            self.label = label

        def predict(self, rows):
            return np.full(len(rows), self.label)

    monkeypatch.setattr(baselines, "_solve", lambda c, rows, labels: FirstRow(labels[0]))
    moved = reorder_stability((x, y), 1.0, test)
    order = np.random.default_rng(baselines.REORDER_SEED)
    firsts = [y[order.permutation(90)][0] for _ in range(2)]
    expected = 40 if any(f != y[0] for f in firsts) else 0
    assert moved["max_changed_predictions"] == expected and moved["max_accuracy_change"] == expected / 40
    assert expected == 40  # this seed's permutations do start on another class


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    variants = {"frozen": {"trainable": "none"}, "cut3_frozen": {"cut_after": "block3", "trainable": "none"}}
    params_path, prepared = make_tiny_project(root, variants)
    result = run_stage(
        "baselines",
        *cli(params=params_path, prepared=prepared, out=root / "baselines", feature_cache=root / "cache"),
        env=stage_env(root),
    )
    return root, result


def test_stage_writes_both_baselines_with_per_image_predictions(baselines_run):
    root, result = baselines_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((root / "baselines" / "metrics.json").read_text())
    assert set(records) == {"pixels_logistic_regression", "frozen_linear_probe"}
    assert records["pixels_logistic_regression"]["dimensions"] == 32 * 32 * 3
    assert records["frozen_linear_probe"]["dimensions"] == 512  # block5_pool at 32x32, flattened
    for name, record in records.items():
        rows = list(csv.DictReader((root / "baselines" / "predictions" / f"{name}.csv").open()))
        assert len(rows) == record["test_images"] == 20
        assert np.mean([r["label"] == r["predicted"] for r in rows]) == pytest.approx(record["test_accuracy"])
        # the main comparison measures how far the predictions move with the row order (the report says it)
        assert record["stability"]["reorderings"] == 2 and 0 <= record["stability"]["max_changed_predictions"] <= 20
        assert record["tol"] == TOL
    # the probes read the features the head-only strategies train on: the shared cache, one entry per cut
    assert len(list((root / "cache").glob("*/train.npy"))) == 2


def test_a_head_only_strategy_on_a_cut_base_gets_a_probe_on_its_own_features(baselines_run):
    root, result = baselines_run
    assert result.returncode == 0, result.stderr[-3000:]
    probes = json.loads((root / "baselines" / baselines.PROBES_FILE).read_text())
    assert set(probes) == {"block3"}  # the whole base's probe is frozen_linear_probe in metrics.json
    record = probes["block3"]
    assert record["dimensions"] == 4 * 4 * 256  # block3_pool at 32x32, flattened (model.pooling: auto)
    assert record["train_images"] == 20 and record["C"] in C_GRID and 0 <= record["test_accuracy"] <= 1
    assert "cut after block3" in record["features"]


def test_baselines_are_mlflow_runs_tagged_as_baselines(baselines_run):
    from mlflow.tracking import MlflowClient

    root, result = baselines_run
    assert result.returncode == 0
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = client.search_runs([experiment.experiment_id], "tags.baseline = 'true'")
    assert sorted(r.info.run_name for r in runs) == [
        "baseline/frozen_linear_probe",
        "baseline/frozen_linear_probe@block3",
        "baseline/pixels_logistic_regression",
    ]
    probe = next(r for r in runs if r.info.run_name.endswith("@block3"))
    record = json.loads((root / "baselines" / baselines.PROBES_FILE).read_text())["block3"]
    assert probe.data.tags["check_of_cut"] == "block3"
    assert probe.data.metrics["evaluation/test_accuracy"] == pytest.approx(record["test_accuracy"])
    records = json.loads((root / "baselines" / "metrics.json").read_text())
    runs = [r for r in runs if "@" not in r.info.run_name]
    for run in runs:
        name = run.info.run_name.split("/")[1]
        assert run.data.metrics["evaluation/test_accuracy"] == pytest.approx(records[name]["test_accuracy"])
        assert float(run.data.params["C"]) == records[name]["C"]
