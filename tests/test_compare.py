"""pipeline.tools.compare_runs: two runs are the same apart from what measures time."""

from __future__ import annotations

import json

from pipeline.tools.compare_runs import differences, main


def _run(root, accuracy, seconds, extra=False):
    seeds = root / "results" / "train" / "frozen" / "seeds" / "1"
    seeds.mkdir(parents=True)
    (seeds / "metrics.json").write_text(
        json.dumps({"test_accuracy": accuracy, "timing": {"train_seconds": seconds}, "epochs_run": 9})
    )
    (seeds / "history.csv").write_text(f"epoch,val_accuracy,epoch_seconds\n1,{accuracy},{seconds}\n")
    (root / "reports").mkdir()
    (root / "reports" / "summary.json").write_text(json.dumps({"answer": {"compute_seconds": {"frozen": seconds}}}))
    if extra:
        (root / "results" / "registered.json").write_text(json.dumps({"variant": "frozen", "version": 3}))


def test_time_measurements_are_not_differences_but_results_are(tmp_path, capsys):
    _run(tmp_path / "a", 0.71, 12.5)
    _run(tmp_path / "b", 0.71, 99.0)
    _run(tmp_path / "c", 0.72, 12.5, extra=True)
    assert differences(tmp_path / "a", tmp_path / "b") == []
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert differences(tmp_path / "a", tmp_path / "c") == [
        f"only in {tmp_path / 'c'}: results/registered.json",
        "differs: results/train/frozen/seeds/1/history.csv",
        "differs: results/train/frozen/seeds/1/metrics.json",
    ]
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "3 difference(s)" in capsys.readouterr().out
