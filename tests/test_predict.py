"""The predict stage: which features each strategy is predicted from, the stage's outputs and MLflow
run on tiny data, and the report's scoring of a predicted ranking against the measured one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.vgg16 import BLOCKS, resolve_trainable
from pipeline.stages.predict import PIXELS, PREDICTORS, predictions, strategy_sources
from pipeline.stages.report import predictions as section
from tests.conftest import cli, make_tiny_project, run_stage, stage_env


@pytest.mark.parametrize(
    ("trainable", "cut", "weights", "expected"),
    [
        ("none", "block5", "hed", ["block5"]),  # frozen: the head reads block5
        ("none", "block2", "hed", ["block2"]),  # a head on a base cut after block2
        (["block5_conv3"], "block5", "hed", ["block4", "block5"]),  # part of block5 trains: block4 is fixed
        (["block5"], "block5", "hed", ["block4", "block5"]),
        (["block3"], "block3", "hed", ["block2", "block3"]),  # cut3_partial
        (["block1_conv2"], "block5", "hed", [PIXELS, "block5"]),  # nothing above the pixels stays fixed
        ("all", "block5", "hed", [PIXELS, "block5"]),  # full fine-tuning
        ("all", "block5", "none", [PIXELS]),  # random weights: only the pixels carry anything
    ],
)
def test_a_strategy_is_predicted_from_its_cut_and_the_highest_fixed_block(trainable, cut, weights, expected):
    assert strategy_sources(resolve_trainable(trainable, cut), cut, weights) == expected


def test_a_strategy_gets_the_best_score_of_its_sources_and_the_ranking_follows():
    sources = {s: dict.fromkeys(PREDICTORS, value) for s, value in {PIXELS: 0.5, "block4": 0.7, "block5": 0.6}.items()}
    cells = {"frozen": ["block5"], "partial": ["block4", "block5"], "scratch": [PIXELS]}
    out = predictions(sources, cells)
    assert set(out) == set(PREDICTORS)
    assert out["logme"]["scores"] == {"frozen": 0.6, "partial": 0.7, "scratch": 0.5}
    assert out["logme"]["ranking"] == ["partial", "frozen", "scratch"]


def test_kendall_tau_and_its_seed_interval_for_perfect_reversed_and_tied_predictions():
    per_seed = {"a": {1: 0.9, 2: 0.8}, "b": {1: 0.7, 2: 0.6}, "c": {1: 0.5, 2: 0.4}}  # a > b > c on every seed
    perfect = section.agreement({"a": 3.0, "b": 2.0, "c": 1.0}, per_seed)
    assert {k: perfect[k] for k in ("tau", "low", "high", "n", "ceiling")} == {
        "tau": 1.0, "low": 1.0, "high": 1.0, "n": 3, "ceiling": 1.0,
    }  # fmt: skip
    assert perfect["p"] == pytest.approx(1 / 3)  # exact: 2 of the 6 orders of 3 have |tau| = 1
    assert section.agreement({"a": 1.0, "b": 2.0, "c": 3.0}, per_seed)["tau"] == -1.0
    tied = section.agreement({"a": 2.0, "b": 2.0, "c": 1.0}, per_seed)  # one of 3 pairs tied
    assert tied["ceiling"] == pytest.approx(np.sqrt(2 / 3)) and tied["tau"] == pytest.approx(tied["ceiling"])
    # seeds that disagree on the order of a and b widen the interval
    noisy = section.agreement(
        {"a": 3.0, "b": 2.0, "c": 1.0}, {"a": {1: 0.9, 2: 0.6}, "b": {1: 0.7, 2: 0.8}, "c": {1: 0.1, 2: 0.1}}
    )
    assert noisy["low"] < noisy["high"]


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    variants = {
        "frozen": {"trainable": "none"},
        "cut3_frozen": {"cut_after": "block3", "trainable": "none"},
        "partial": {"trainable": ["block5"]},
        "scratch": {"trainable": "all", "weights": "none"},
    }
    studies = {"depth": {"k": [0, 3], "seeds": [1]}, "sample_efficiency": {"train_per_class": [1, 2], "seeds": [1, 2]}}
    params_path, prepared = make_tiny_project(root, variants, {"studies": studies})
    result = run_stage(
        "predict", *cli(params=params_path, prepared=prepared, out=root / "predict"), env=stage_env(root)
    )
    return root, result


def test_the_stage_scores_every_block_and_ranks_every_strategy_and_depth_cell(predict_run):
    root, result = predict_run
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((root / "predict" / "scores.json").read_text())
    dimensions = {name: source["dimensions"] for name, source in record["sources"].items()}
    # 32x32: each block flattened as a head there reads it, and averaged over its map where that differs
    assert dimensions == {
        PIXELS: 32 * 32,
        "block1": 16 * 16 * 64, "block1_gap": 64,
        "block2": 8 * 8 * 128, "block2_gap": 128,
        "block3": 4 * 4 * 256, "block3_gap": 256,
        "block4": 2 * 2 * 512, "block4_gap": 512,
        "block5": 512,
    }  # fmt: skip
    for source in record["sources"].values():
        assert 0 <= source["ridge_probe"] <= 1 and source["gbc"] <= 0
        assert all(np.isfinite(source[name]) for name in PREDICTORS)
    cells = {"frozen", "cut3_frozen", "partial", "scratch", "top0", "top3"}
    assert record["strategy_sources"]["top3"] == ["block4", "block5"]  # the top 3 conv layers are block5's
    assert record["strategy_sources"]["scratch"] == [PIXELS]
    for name in PREDICTORS:
        prediction = record["predictions"][name]
        assert set(prediction["ranking"]) == cells
        expected = max(record["sources"][s][name] for s in record["strategy_sources"]["partial"])
        assert prediction["scores"]["partial"] == expected
    per_layer = record["relative_gradient_norm"]["per_layer"]
    assert set(per_layer) == {layer for block in BLOCKS.values() for layer in block}
    assert all(value > 0 for value in per_layer.values())
    assert record["auto_rgn_block"] == max(BLOCKS, key=record["relative_gradient_norm"]["per_block"].get)
    assert record["images"] == {"train": 20, "val": 10}


def test_the_stage_logs_one_mlflow_run_with_every_score(predict_run):
    from mlflow.tracking import MlflowClient

    root, result = predict_run
    assert result.returncode == 0
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'predict'")
    record = json.loads((root / "predict" / "scores.json").read_text())
    assert run.info.run_name == "predict" and run.info.status == "FINISHED"
    assert run.data.metrics["block3/logme"] == pytest.approx(record["sources"]["block3"]["logme"])
    assert run.data.metrics["rgn/block1_conv1"] == pytest.approx(
        record["relative_gradient_norm"]["per_layer"]["block1_conv1"]
    )
    assert run.data.metrics["n1/block2/h_score"] == pytest.approx(
        record["sample_efficiency"]["1"]["sources"]["block2"]["h_score"]
    )
    assert len([k for k in run.data.metrics if not k.startswith(("rgn/", "system/", "n1/", "n2/"))]) == len(
        record["sources"]
    ) * len(PREDICTORS)
    assert len([k for k in run.data.metrics if k.startswith("n1/")]) == len(record["sources"]) * (len(PREDICTORS) - 1)


def test_each_sample_efficiency_size_is_scored_on_the_subsets_its_seeds_train_on(predict_run):
    root, result = predict_run
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((root / "predict" / "scores.json").read_text())
    one, two = record["sample_efficiency"]["1"], record["sample_efficiency"]["2"]
    assert one["images"] == {"train": 10, "val": 10} and two["images"] == {"train": 20, "val": 10}
    assert one["seeds"] == [1, 2]
    # 2 per class is the whole pool, which is the prepared training split here (both drawn with 2 per
    # class from the same seed): every seed's subset is that split, so the scores are the main ones
    for source, scores in record["sources"].items():
        assert {p: two["sources"][source][p] for p in PREDICTORS} == pytest.approx({p: scores[p] for p in PREDICTORS})
    # the predicted "does transfer help?" per size, from that size's probes
    helps = two["transfer_helps"]
    assert helps["probe"] == max(v["ridge_probe"] for k, v in two["sources"].items() if k != PIXELS)
    assert helps["difference"] == pytest.approx(helps["probe"] - two["sources"][PIXELS]["ridge_probe"])
    # one image per class: GBC has no within-class variance and is left out, saying so; the rest are scored
    assert "gbc" not in one["predictions"] and set(one["not_scored"]) == {"gbc"} and two["not_scored"] == {}
    # only the strategies of params.yaml (the study trains them, not the depth cells)
    assert set(one["predictions"]["logme"]["ranking"]) == {"frozen", "cut3_frozen", "partial", "scratch"}
    sources = record["strategy_sources"]["partial"]
    assert one["predictions"]["ridge_probe"]["scores"]["partial"] == max(
        one["sources"][s]["ridge_probe"] for s in sources
    )
    # the two seeds' subsets of one image per class differ, and each differs from the whole split
    assert one["sources"]["block5"]["logme"] != pytest.approx(record["sources"]["block5"]["logme"])


def test_a_size_is_scored_on_exactly_the_subsets_the_study_trains_on(predict_run):
    """Recomputed here on the pixels: each seed's subset drawn as `train` draws it (the study's pool,
    `nested_subset` with [params.seed, seed]), scored, averaged over the seeds."""
    from pipeline.core.data import nested_subset
    from pipeline.core.params import load_params
    from pipeline.core.splits import sample_efficiency_pool
    from pipeline.stages.predict import pixel_features, score_source

    root, result = predict_run
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((root / "predict" / "scores.json").read_text())
    params = load_params(root / "params.yaml")
    pool = sample_efficiency_pool(params, 1)
    (images, labels), (val_images, val_labels) = pool.splits["train"], pool.splits["val"]
    used = tuple(p for p in PREDICTORS if p != "gbc")
    runs = []
    for seed in (1, 2):
        rows = nested_subset(labels, 1, [params.seed, seed])
        runs.append(
            score_source((pixel_features(images[rows]), labels[rows]), (pixel_features(val_images), val_labels), used)
        )
    expected = {p: np.mean([run[p] for run in runs]) for p in used}
    assert record["sample_efficiency"]["1"]["sources"][PIXELS] == pytest.approx(expected)
    # the seeds' draws differ (else the mean would hide a draw that ignores the seed)
    assert runs[0]["logme"] != pytest.approx(runs[1]["logme"])


def test_the_report_section_scores_each_predictor_against_the_measured_ranking():
    record = {
        "images": {"train": 500, "val": 500},
        "sources": {PIXELS: {}, "block2": {}, "block5": {}},
        "predictions": {name: {"scores": {"a": 3.0, "b": 2.0, "c": 1.0}} for name in PREDICTORS},
        "strategy_sources": {"a": ["block2"], "b": ["block5"], "c": [PIXELS]},
        "transfer_helps": {"best_source": "block2", "probe": 0.8, "pixels_probe": 0.7, "difference": 0.1},
        "relative_gradient_norm": {"per_block": {"block4": 5.0, "block5": 4.0}},
        "auto_rgn_block": "block4",
        "seconds": {"total": 30.0},
    }
    parts = {"tuning": 60.0, "feature_extraction": 0.0, "training_per_run": 12.0}
    results = {
        v: {"test_accuracy": {1: acc, 2: acc}, "evidence": {"compute_parts": parts}}
        for v, acc in {"a": 0.8, "b": 0.7, "c": 0.75}.items()
    }
    blocks = section.blocks(record, results, pixels=0.76)
    (table,) = [b for b in blocks if b[0] == "table"]
    assert [row for row in table[2]] == [
        [section.LABELS[name], "`a`", "0.800", "+0.33", "1", "[+0.33, +0.33]", "1.00"] for name in PREDICTORS
    ]
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "Measured: `a` reaches 0.800 test accuracy against 0.760" in text and "(+0.040;" in text
    assert "optimistic for transfer: the best of 2 feature sources" in text
    assert "Auto-RGN would train `block4` first" in text
    assert "took 30 s, the measured comparison 4 min" in text  # 3 x (60 + 2 x 12) s
    assert section.blocks(None, results) == []
    # the depth study's cells, when it ran, get their own table (cells the prediction lacks are left out)
    record["strategy_sources"] |= {"top0": ["block5"], "top3": ["block4", "block5"], "top7": ["block3", "block5"]}
    for name in PREDICTORS:
        record["predictions"][name]["scores"] |= {"top0": 1.0, "top3": 2.0, "top7": 2.0}
    depth = {
        "top0": {"test_accuracy": {1: 0.70}},
        "top3": {"test_accuracy": {1: 0.72}},
        "top7": {"test_accuracy": {1: 0.71}},
        "top9": {"test_accuracy": {1: 0.69}},  # not predicted: left out
    }
    tables = [b for b in section.blocks(record, results, 0.76, depth) if b[0] == "table"]
    assert len(tables) == 2 and tables[1][1][1] == "predicted best cell"
    # a tie at the top names every tied cell; one seed: no resampling interval
    assert tables[1][2][0][1:] == ["`top3` = `top7`", "0.720 / 0.710", "+0.82", "0.22", "[—, —]", "0.82"]
    for cell in depth.values():  # with their measured seconds, the cells' cost is stated
        cell["evidence"] = {"compute_parts": {"tuning": 100.0, "feature_extraction": 20.0, "training_per_run": 60.0}}
    text = " ".join(b[1] for b in section.blocks(record, results, 0.76, depth) if b[0] == "p")
    assert "The cells took 9 min of tuning and training" in text  # 3 predicted cells x (100 + 20 + 60 x 1 seed) s
    # the sample-efficiency study: one ranking per size, against that size's own scores
    record["sample_efficiency"] = {
        "10": {
            "predictions": {name: {"scores": {"a": 1.0, "b": 2.0, "c": 3.0}} for name in PREDICTORS if name != "gbc"},
            "not_scored": {"gbc": "why"},
        }
    }
    sample = {
        v: {10: {"test_accuracy": {1: acc, 2: acc}}, 25: {"test_accuracy": {1: acc}}}
        for v, acc in {"a": 0.5, "b": 0.6, "c": 0.7}.items()
    }
    blocks = section.blocks(record, results, 0.76, None, sample)
    tables = [b for b in blocks if b[0] == "table"]
    assert len(tables) == 2 and tables[1][1][:2] == ["images per class", "predictor"]
    assert tables[1][2] == [  # size 25 has no scores: no rows
        ["10", section.LABELS[name], "`c`", "0.700", "+1.00", "0.33", "[+1.00, +1.00]", "1.00"]
        for name in PREDICTORS
        if name != "gbc"
    ]
    assert "GBC at 10 per class: why" in " ".join(b[1] for b in blocks if b[0] == "p")
    # does transfer help at each size: predicted (probes, validation) beside measured (test) where baselines ran
    record["sample_efficiency"]["10"]["transfer_helps"] = {
        "best_source": "block2", "probe": 0.62, "pixels_probe": 0.66, "difference": -0.04,
    }  # fmt: skip
    record["seconds"]["sample_efficiency"] = 12.0
    blocks = section.blocks(record, results, 0.76, None, sample, {10: 0.65})
    tables = [b for b in blocks if b[0] == "table"]
    assert tables[-1][1] == section.HELPS_HEADERS
    # a and b are predicted from pretrained blocks, c from the pixels: b is the best pretrained strategy
    assert tables[-1][2] == [["10", "`block2` 0.620", "0.660", "-0.040", "`b` 0.600", "0.650", "-0.050"]]
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "the prediction took 18 s" in text and "sample-efficiency sizes took another 12 s" in text


def test_a_strategy_on_other_pretrained_weights_is_left_out_saying_why(default_raw_params):
    from pipeline.core.params import parse_params
    from pipeline.stages.predict import candidates

    raw = {
        **default_raw_params,
        "variants": {**default_raw_params["variants"], "imagenet_frozen": {"trainable": "none", "weights": "imagenet"}},
    }
    cells, skipped = candidates(parse_params(raw))
    assert "imagenet_frozen" not in cells and set(cells) == set(default_raw_params["variants"])
    assert skipped == {
        "imagenet_frozen": "its weights (imagenet) are not model.weights (hed), whose features are scored"
    }
    # random weights need no features: such a strategy is predicted from the pixels
    raw["model"] = {**raw["model"], "weights": "none"}
    cells, skipped = candidates(parse_params(raw))
    assert cells["scratch"] == cells["frozen"] == [PIXELS] and set(skipped) == {"imagenet_frozen"}


def test_pixels_are_one_channel_for_grey_images_and_all_three_for_colour():
    from pipeline.stages.predict import pixel_features

    grey = np.repeat(np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1), 3, axis=3)
    assert pixel_features(grey).shape == (2, 16) and pixel_features(grey)[0, 1] == pytest.approx(1 / 255)
    colour = grey.copy()
    colour[..., 2] = 255
    assert pixel_features(colour).shape == (2, 48) and pixel_features(colour)[0, 2] == 1.0
