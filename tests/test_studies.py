"""The research studies: corruptions, nested subsets, the study stages on tiny data (train
--train-per-class, tune/train --depth, the report's study sections) and the advantage table."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from pipeline.core.corruptions import BLUR_SIGMA_PER_32PX, CONTRAST_FACTOR, NOISE_SIGMA, corrupt
from pipeline.core.data import nested_subset
from pipeline.core.results import read_predictions
from pipeline.stages.baselines import C_GRID
from pipeline.stages.report.studies import _vanishing_point, advantage_table
from tests.conftest import make_tiny_project, run_stage, stage_env

# --- corruptions ------------------------------------------------------------------------------


@pytest.fixture
def images():
    rng = np.random.default_rng(3)
    return rng.integers(30, 220, size=(6, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("kind", ["gaussian_noise", "blur", "contrast"])
def test_corruptions_are_seeded_in_range_and_leave_the_input_alone(images, kind):
    original = images.copy()
    first = corrupt(images, kind, 3, seed=7)
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 255
    assert not np.array_equal(first, images)
    np.testing.assert_array_equal(corrupt(images, kind, 3, seed=7), first)  # same seed: same images
    np.testing.assert_array_equal(images, original)


def test_noise_has_the_severitys_standard_deviation_and_depends_on_the_seed():
    flat = np.full((4, 64, 64, 3), 128.0, dtype=np.float32)  # far from the clipping bounds
    for severity in (1, 3):
        noisy = corrupt(flat, "gaussian_noise", severity, seed=0)
        assert np.std(noisy - flat) == pytest.approx(NOISE_SIGMA[severity - 1] * 255, rel=0.02)
    assert not np.array_equal(corrupt(flat, "gaussian_noise", 3, 0), corrupt(flat, "gaussian_noise", 3, 1))


def test_blur_keeps_flat_images_and_the_mean_and_smooths_an_edge():
    flat = np.full((1, 32, 32, 3), 77.0, dtype=np.float32)
    np.testing.assert_allclose(corrupt(flat, "blur", 5, 0), flat, atol=1e-4)
    edge = np.zeros((1, 32, 32, 3), dtype=np.float32)
    edge[:, :, 16:] = 255
    blurred = corrupt(edge, "blur", 3, 0)
    assert blurred.mean() == pytest.approx(edge.mean(), rel=1e-3)  # reflected edges keep the mass
    row = blurred[0, 10, :, 0]
    assert 0 < row[15] < 255 and 0 < row[16] < 255 and np.all(np.diff(row) >= -1e-3)
    assert BLUR_SIGMA_PER_32PX[2] == 1.0  # severity 3 at 32 px: sigma of one pixel


def test_contrast_scales_deviations_from_each_images_mean(images):
    out = corrupt(images, "contrast", 2, 0)
    for original, low in zip(images, out, strict=True):
        np.testing.assert_allclose(low - low.mean(), (original - original.mean()) * CONTRAST_FACTOR[1], atol=1e-3)


def test_unknown_corruption_and_severity_are_refused(images):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 3, 0)
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(images, "blur", 6, 0)


# --- nested subsets ---------------------------------------------------------------------------


def test_nested_subsets_take_n_per_class_and_grow_by_adding_images():
    labels = np.repeat(np.arange(4), 30)
    subsets = {n: nested_subset(labels, n, [42, 1]) for n in (2, 5, 30)}
    for n, index in subsets.items():
        assert np.all(np.diff(index) > 0)  # sorted, unique
        assert np.bincount(labels[index]).tolist() == [n] * 4
    assert set(subsets[2]) < set(subsets[5]) < set(subsets[30])
    assert not np.array_equal(nested_subset(labels, 5, [42, 2]), subsets[5])  # another seed, another draw
    np.testing.assert_array_equal(nested_subset(labels, 5, [42, 1]), subsets[5])


# --- the advantage table ----------------------------------------------------------------------


def _correct(accuracy: float, seed: int, images: int = 2000) -> np.ndarray:
    """A 0/1 row with exactly accuracy x images ones, placed at random."""
    row = np.zeros(images, dtype=np.int8)
    row[np.random.default_rng(seed).permutation(images)[: round(accuracy * images)]] = 1
    return row


def _sample(accuracies: dict[int, list[float]]) -> tuple[dict, dict]:
    """`frozen` at the given per-seed accuracies for every size; the reference at 0.5 for every seed."""
    frozen = {
        n: {"correct": np.array([_correct(a, 10 * n + s) for s, a in enumerate(accs)])}
        for n, accs in accuracies.items()
    }
    reference = {n: np.array([_correct(0.5, 1000 + s) for s in range(len(accs))]) for n, accs in accuracies.items()}
    return {"frozen": frozen}, reference


def test_advantage_vanishes_after_the_last_significant_size():
    sample, reference = _sample({10: [0.70, 0.72, 0.71], 50: [0.60, 0.62, 0.61], 250: [0.51, 0.49, 0.50]})
    headers, rows = advantage_table(sample, reference)
    assert headers == ["strategy", "Δ at n=10", "Δ at n=50", "Δ at n=250", "significant advantage vanishes at"]
    (row,) = rows
    assert row[0] == "**frozen**"
    assert row[1].startswith("+0.210 [+0.") and row[2].startswith("+0.110 [+0.")
    assert row[3].startswith("+0.000 [-0.")
    assert row[-1] == "n = 250 per class (last significant at n = 50)"


def test_advantage_interval_includes_the_test_images_noise():
    """Every seed scores exactly 0.53 (no seed variance): on 400 test images the interval still has
    the width of the images' sampling error (about ±0.07 for a difference of two ~50% accuracies)."""
    frozen = {10: {"correct": np.array([_correct(0.53, s, images=400) for s in range(3)])}}
    reference = {10: np.array([_correct(0.5, 100 + s, images=400) for s in range(3)])}
    _, [row] = advantage_table({"frozen": frozen}, reference)
    low, high = (float(x) for x in row[1].split("[")[1].rstrip("]").split(","))
    assert low < 0 < high and high - low > 0.08
    assert row[-1] == "no significant advantage at any size (10–10)"


def test_advantage_that_persists_or_never_appears_is_said_so():
    assert _vanishing_point({10: True, 50: True}) == "does not vanish within 10–50 per class"
    assert _vanishing_point({10: False, 50: False}) == "no significant advantage at any size (10–50)"
    # a significant advantage at a larger size counts: it has not vanished at 50
    assert _vanishing_point({10: True, 50: False, 250: True}) == (
        "does not vanish within 10–250 per class (not significant at n = 50)"
    )
    # significant only at the largest size: said so, not just "does not vanish"
    assert (
        _vanishing_point({10: False, 25: True}) == "does not vanish within 10–25 per class (not significant at n = 10)"
    )


# --- the study stages on tiny data ------------------------------------------------------------

STUDIES = {
    "studies": {
        "sample_efficiency": {"train_per_class": [1, 3], "seeds": [1, 2]},
        "depth": {"k": [1], "seeds": [1]},
        "robustness": {"enabled": True, "severity": 2},
    },
    "train": {"max_epochs": 2, "patience": 1, "seeds": [1], "batch_size": 8},
}


def _run(root, module, *args):
    result = run_stage(module, "--params", root / "params.yaml", *args, env=stage_env(root))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def studies_run(tmp_path_factory):
    """Main train of two strategies, the sample-efficiency stage at n=3 for both, the depth
    stages at k=1, then the report, all through their command lines."""
    root = tmp_path_factory.mktemp("studies")
    variants = {
        "frozen": {"trainable": "none"},
        "partial": {"trainable": ["block5"], "warmup_epochs": 1, "lr_multipliers": {"block5": 0.5}},
    }
    make_tiny_project(root, variants, STUDIES)
    prepared, cache = str(root / "prepared"), str(root / "cache")
    for variant in variants:
        out = str(root / "results/train" / variant)
        _run(root, "train", "--variant", variant, "--prepared", prepared, "--out", out, "--feature-cache", cache)
    studies = root / "results" / "studies"
    _run(root, "baselines", "--prepared", prepared, "--feature-cache", cache, "--out", str(root / "results/baselines"))
    for variant in variants:  # two strategies at n=3: the answer's rule applies at that size
        _run(
            root,
            "train",
            "--variant",
            variant,
            "--train-per-class",
            "3",
            "--no-model",
            "--feature-cache",
            cache,
            "--out",
            str(studies / f"sample_efficiency/{variant}/n3"),
        )
    _run(
        root,
        "baselines",
        "--train-per-class",
        "3",
        "--feature-cache",
        cache,
        "--out",
        str(studies / "sample_efficiency/baselines/n3"),
    )
    _run(
        root,
        "tune",
        "--depth",
        "1",
        "--prepared",
        prepared,
        "--feature-cache",
        cache,
        "--out",
        str(studies / "depth/tune/block5/top1"),
    )
    best = str(studies / "depth/tune/block5/top1/best_params.json")
    _run(
        root,
        "train",
        "--depth",
        "1",
        "--prepared",
        prepared,
        "--no-model",
        "--feature-cache",
        cache,
        "--best-params",
        best,
        "--out",
        str(studies / "depth/train/block5/top1"),
    )
    report = _run(
        root,
        "report",
        "--prepared",
        prepared,
        "--train-dir",
        str(root / "results/train"),
        "--tune-dir",
        str(root / "results/tune"),
        "--studies-dir",
        str(studies),
        "--baselines-dir",
        str(root / "results/baselines"),
        "--out",
        str(root / "reports"),
    )
    return root, report


def _seed_metrics(folder, seed):
    return json.loads((folder / "seeds" / str(seed) / "metrics.json").read_text())


@pytest.mark.slow  # the study stages' processes (shared fixture, ~90 s)
def test_sample_efficiency_stage_trains_each_seed_on_its_own_nested_subset(studies_run):
    root, _ = studies_run
    folder = root / "results/studies/sample_efficiency/frozen/n3"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "seeds"]  # --no-model: no model.keras
    for seed in (1, 2):  # studies.sample_efficiency.seeds, not train.seeds
        metrics = _seed_metrics(folder, seed)
        assert metrics["train_images"] == 30  # 3 per class x 10 classes
        assert metrics["training_path"] == "cached-features (cut after block5_pool)"
        assert set(metrics["robustness"]["accuracy"]) == {"gaussian_noise", "blur", "contrast"}
    first, second = (_seed_metrics(folder, s)["test_accuracy"] for s in (1, 2))
    assert json.loads((folder / "metrics.json").read_text())["test_accuracy_mean"] == pytest.approx(
        (first + second) / 2
    )


@pytest.mark.slow  # the study stages' processes (shared fixture, ~90 s)
def test_sample_efficiency_baselines_fit_every_seed_on_the_same_test_images(studies_run):
    root, _ = studies_run
    folder = root / "results/studies/sample_efficiency/baselines/n3"
    records = json.loads((folder / "metrics.json").read_text())
    assert set(records) == {"pixels_logistic_regression", "frozen_linear_probe"}
    trained = root / "results/studies/sample_efficiency/frozen/n3"
    for name, record in records.items():
        assert sorted(record["seeds"]) == ["1", "2"] and record["train_per_class"] == 3
        assert all(r["train_images"] == 30 and r["C"] in C_GRID for r in record["seeds"].values())
        assert record["test_accuracy_mean"] == pytest.approx(
            np.mean([r["test_accuracy"] for r in record["seeds"].values()])
        )
        for seed in (1, 2):
            labels, predicted = read_predictions(folder / "predictions" / name / f"{seed}.csv")
            np.testing.assert_array_equal(
                labels, read_predictions(trained / "seeds" / str(seed) / "test_predictions.csv")[0]
            )
            assert np.mean(predicted == labels) == record["seeds"][str(seed)]["test_accuracy"]
    # the pixel baseline on seed 1's subset is exactly a fit on those rows of the pool
    from pipeline.core.data import nested_subset
    from pipeline.core.params import load_params
    from pipeline.core.splits import sample_efficiency_pool
    from pipeline.stages.baselines import PIXELS, fit, pixels

    params = load_params(root / "params.yaml")
    pool = sample_efficiency_pool(params, 3)
    rows = nested_subset(pool.splits["train"][1], 3, [params.seed, 1])
    x = {PIXELS: {s: pixels(images) for s, (images, _) in pool.splits.items()}}
    expected, _ = fit(params, x, pool.splits, pool.class_names, rows)
    assert expected[PIXELS]["test_accuracy"] == records[PIXELS]["seeds"]["1"]["test_accuracy"]
    assert expected[PIXELS]["C"] == records[PIXELS]["seeds"]["1"]["C"]


@pytest.mark.slow  # the study stages' processes (shared fixture, ~90 s)
def test_depth_stages_train_exactly_the_top_k_layers(studies_run):
    root, _ = studies_run
    best = json.loads((root / "results/studies/depth/tune/block5/top1/best_params.json").read_text())
    metrics = _seed_metrics(root / "results/studies/depth/train/block5/top1", 1)
    per_block = metrics["parameters"]["per_block"]
    assert per_block["block5"]["trainable"] == 3 * 3 * 512 * 512 + 512  # block5_conv3 only
    assert all(per_block[b]["trainable"] == 0 for b in ("block1", "block2", "block3", "block4"))
    assert metrics["training_path"] == "cached-features (cut after block5_conv2)"
    assert metrics["head_units"] == best["head_units"]
    assert metrics["weight_drift"]["block4"] == 0.0 and metrics["weight_drift"]["block5"] > 0


@pytest.mark.slow  # the study stages' processes (shared fixture, ~90 s)
def test_two_phase_strategy_records_phases_and_drift_in_history_and_mlflow(studies_run):
    root, _ = studies_run
    history = (root / "results/train/partial/seeds/1/history.csv").read_text().splitlines()
    assert history[0].split(",")[:2] == ["epoch", "phase"] and "drift_block5" in history[0]
    assert [line.split(",")[1] for line in history[1:]] == ["warmup", "main"]
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = mlflow.MlflowClient()
    name = "attributes.run_name = 'train/partial/seed-1'"
    (run,) = mlflow.search_runs(experiment_names=["vgg16-freezing"], filter_string=name, output_format="list")
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "weight_drift/block5")]
    assert [s for s, _ in steps] == [1, 2] and steps[0][1] == 0.0 and steps[1][1] > 0
    assert run.data.params["warmup_epochs"] == "1" and run.data.params["lr_multipliers.block5"] == "0.5"
    names = {
        r.info.run_name: r.data.tags.get("study")
        for r in mlflow.search_runs(experiment_names=["vgg16-freezing"], output_format="list")
    }
    assert names["sample_efficiency/frozen/n3/seed-2"] == "sample_efficiency"
    assert names["depth/top1/seed-1"] == "depth"


@pytest.mark.slow  # the study stages' processes (shared fixture, ~90 s)
def test_report_shows_the_study_sections_and_figures(studies_run):
    root, report = studies_run
    assert "studies: sample_efficiency, depth" in report.stdout
    text = (root / "reports/report.md").read_text()
    for heading in (
        "## Weight drift",
        "## Robustness to corrupted inputs",
        "## Study: sample efficiency",
        "## Study: freezing depth",
    ):
        assert heading in text
    figures = {p.name for p in (root / "reports/figures").glob("*.png")}
    assert {"weight_drift.png", "robustness.png", "sample_efficiency.png", "depth.png", "depth_drift.png"} <= figures
    assert "`partial`: 1 head-only warm-up epoch(s) first" in text
    assert "learning rate per block: block5 ×0.5" in text
    # n=1 was configured but not run: the table has n=3 only
    assert "| **frozen** | " in text and "n=3" in text and "n=1 " not in text
    # the references: fitted on the study's subsets, and the main baselines beside the depths
    assert "| *reference: logistic regression on pixels* | " in text
    assert "### Against the pixel baseline" in text
    answers = text[text.index("### The answer at each size") :]
    row = next(line for line in answers.splitlines() if line.startswith("| 3 |"))
    assert row.split("|")[2].strip() in ("`frozen`", "`partial`")  # best on validation at n=3
    depth = text[text.index("## Study: freezing depth") :]
    assert "| *reference: convex linear probe on the frozen features* |" in depth
    assert "(deterministic)" in depth and "Δ vs pixels LR" in depth
