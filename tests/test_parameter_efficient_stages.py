"""The parameter-efficient study's stages through their command lines, as dvc.yaml runs them:
`tune --parameter-efficient NAME` then `train --parameter-efficient NAME` on tiny data, for a
strategy that trains a LoRA update of block5 on cached block4 features. The study's runs follow
the main comparison's rule and seeds, turn the robustness test on for themselves only, and are
named as the study's in MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest

from tests.conftest import cli, make_tiny_project, run_stage, stage_env

STUDY = {
    "studies": {
        "parameter_efficient": {
            "run": ["lora_block5"],
            "strategies": {"lora_block5": {"trainable": ["block5"], "parameters": "lora", "lora_rank": 2}},
        }
    },
    "train": {"max_epochs": 2, "patience": 1, "seeds": [1, 2], "batch_size": 8},
    "tune": {"n_trials": 2, "startup_trials": 2},
}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parameter_efficient")
    params_path, prepared = make_tiny_project(root, {"frozen": {"trainable": "none"}}, STUDY)
    folder = root / "results/studies/parameter_efficient"
    common = dict(params=params_path, prepared=prepared, feature_cache=root / "cache")
    tune = run_stage(
        "tune", *cli(parameter_efficient="lora_block5", out=folder / "tune/lora_block5", **common), env=stage_env(root)
    )
    assert tune.returncode == 0, tune.stderr[-3000:]
    best = folder / "tune/lora_block5/best_params.json"
    options = cli(parameter_efficient="lora_block5", best_params=best, out=folder / "train/lora_block5", **common)
    train = run_stage("train", *options, "--no-model", env=stage_env(root))
    assert train.returncode == 0, train.stderr[-3000:]
    return root, folder


def test_the_study_strategy_tunes_and_trains_over_the_main_seeds_with_its_parameter_count(study_run):
    _, folder = study_run
    trials = (folder / "tune/lora_block5/trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2  # tune.n_trials, the main comparison's budget
    best = json.loads((folder / "tune/lora_block5/best_params.json").read_text())
    train = folder / "train/lora_block5"
    assert sorted(p.name for p in (train / "seeds").iterdir()) == ["1", "2"]  # train.seeds
    for seed in (1, 2):
        metrics = json.loads((train / "seeds" / str(seed) / "metrics.json").read_text())
        per_block = metrics["parameters"]["per_block"]
        assert per_block["block5"]["trainable"] == 3 * 2 * (9 * 512 + 512)  # r x (9 C_in + C_out) per layer
        assert all(per_block[b]["trainable"] == 0 for b in ("block1", "block2", "block3", "block4"))
        assert metrics["training_path"] == "cached-features (cut after block4_pool)"
        assert metrics["frozen_weights_unchanged"] is True
        assert metrics["head_units"] == best["head_units"]
        assert set(metrics["robustness"]["accuracy"]) == {"gaussian_noise", "blur", "contrast"}  # on for the study
    assert not (train / "model.keras").exists()


def test_the_study_runs_are_named_and_tagged_as_the_studys_in_mlflow(study_run):
    root, _ = study_run
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["vgg16-freezing"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    seed = by_name["parameter_efficient/lora_block5/seed-1"]
    assert seed.data.tags["study"] == "parameter_efficient"
    assert seed.data.params["parameters"] == "lora" and seed.data.params["lora_rank"] == "2"
    assert "tune/lora_block5" in by_name


@pytest.fixture(scope="module")
def study_report(tmp_path_factory):
    """The main comparison (frozen, partial = block5) and the study (LoRA on block5, block5 alone)
    trained through their stages, the baselines, then the report over all of it."""
    root = tmp_path_factory.mktemp("parameter_efficient_report")
    strategies = {
        "lora_block5": {"trainable": ["block5"], "parameters": "lora", "lora_rank": 2},
        "surgical_block5": {"trainable": ["block5"]},
    }
    override = {**STUDY, "studies": {"parameter_efficient": {"run": list(strategies), "strategies": strategies}}}
    variants = {"frozen": {"trainable": "none"}, "partial": {"trainable": ["block5"]}}
    params_path, prepared = make_tiny_project(root, variants, override)
    common = dict(params=params_path, prepared=prepared, feature_cache=root / "cache")
    env = stage_env(root)
    studies = root / "results/studies"
    commands = [("train", cli(variant=v, out=root / "results/train" / v, **common)) for v in variants]
    for name in strategies:
        best = studies / "parameter_efficient/tune" / name / "best_params.json"
        commands += [
            ("tune", cli(parameter_efficient=name, out=best.parent, **common)),
            ("train", cli(parameter_efficient=name, best_params=best, out=studies / "parameter_efficient/train" / name,
                          no_model=True, **common)),
        ]  # fmt: skip
    commands.append(("baselines", cli(out=root / "results/baselines", **common)))
    for module, args in commands:
        result = run_stage(module, *args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    report = run_stage(
        "report",
        *cli(params=params_path, prepared=prepared, train_dir=root / "results/train", tune_dir=root / "no-tune",
             baselines_dir=root / "results/baselines", studies_dir=studies, out=root / "reports"),
        env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    return root, report


@pytest.mark.slow  # eight stage processes (~2 min)
def test_the_report_reads_the_study_beside_the_main_strategies(study_report):
    root, report = study_report
    assert "studies: parameter_efficient" in report.stdout
    text = (root / "reports/report.md").read_text()
    section = text[text.index("## Study: beyond layer freezing") :]
    assert "Best on validation among every strategy and baseline" in section
    table = section[: section.index("### Surgical single blocks")]  # the study's strategies
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert list(rows) == ["`lora_block5`", "`surgical_block5`"]
    assert "block5: LoRA rank 2 on the kernels" in rows["`lora_block5`"]
    assert "cached on block4_pool" in rows["`lora_block5`"] and "| block5 |" in rows["`surgical_block5`"]
    surgical = next(line for line in section.splitlines() if line.startswith("| block5 |"))
    assert "`surgical_block5`" in surgical and "`partial`" in surgical  # matched on definitions
    assert "### On corrupted test images" in section and "gaussian_noise" in section
    assert "Is block 1 the block to fine-tune" not in section  # no block1 strategy ran: nothing to claim
    figures = {p.name for p in (root / "reports/figures").glob("beyond_*.png")}
    assert figures == {"beyond_pareto.png", "beyond_robustness.png"}
    pareto = section[section.index("### Accuracy against cost, every strategy") :]
    assert all(f"`{name}`" in pareto for name in ("frozen", "partial", "lora_block5", "surgical_block5"))
    # the DVC metric holds the study's strategies beside the main ones (a row of `dvc exp show`)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    summary = json.loads((root / "reports/summary.json").read_text())
    assert {"lora_block5", "surgical_block5"} <= set(metrics) and "lora_block5" not in summary
    low, mean, high = (metrics["surgical_block5"][k] for k in ("ci_low", "test_acc", "ci_high"))
    assert low < mean < high and 0 <= mean <= 1  # tiny data: the interval may cross 0
    assert f"{mean:.3f} [{low:.3f}, {high:.3f}]" in rows["`surgical_block5`"]
