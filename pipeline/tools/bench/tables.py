"""reports/benchmark.md from the benchmark's JSON parts (each stamped with its date and commit)."""

from __future__ import annotations


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _stage_name(argv: list[str]) -> str:
    stage = argv[0]
    if "--variant" in argv:
        stage += f"@{argv[argv.index('--variant') + 1]}"
    return stage


def render(
    bench: dict | None,
    e2e: dict | None,
    numerics: dict | None = None,
    tune: dict | None = None,
    folders: dict | None = None,
    beyond: dict | None = None,
) -> str:
    """The Markdown page from whichever parts exist, one section per measurement (`beyond`: the
    parameter-efficient study's strategies, timed like the main ones)."""
    lines = ["# Benchmark", ""]
    if bench:
        lines += _header(bench)
    if bench and "matmul" in bench:
        lines += _compute(bench)
    if bench and "strategies" in bench:
        lines += _strategies(bench)
    if beyond:
        title = "Beyond layer freezing: the study's strategies, timed the same way"
        lines += [*_strategies(beyond, title), "", f"Measured {beyond['date']} at commit {beyond['commit']}."]
    if tune:
        lines += _tuning(tune)
    if bench and bench.get("large_study"):
        lines += _large_study(bench)
    if e2e:
        lines += _end_to_end(e2e)
    if numerics:
        lines += _numerics(numerics)
    if folders:
        lines += _folders(folders)
    return "\n".join(lines) + "\n"


def _folders(folders: dict) -> list[str]:
    width, height = folders["camera"]
    lines = [
        "",
        "## Reading an image folder of camera-size photos",
        "",
        f"Measured {folders['date']} at commit `{folders['commit']}` by `make bench-folders`: "
        f"{folders['rows'][0]['files']} generated {width}x{height} JPEGs (quality 90) in three class folders, "
        f"read to the target size; {folders['workers']} cores. `before`: every file decoded in full twice, one "
        "core (prepare until issue 28); `one decode`: in full once; `draft`: once in JPEG draft mode; "
        "`pipeline`: draft mode over one process per core (`pipeline/core/folders.py`).",
        "",
        f"| target | path | seconds | images/s | {folders['projected_images']:,} images | speed-up |",
        "|---:|---|---|---:|---:|---:|",
    ]
    before = {r["image_size"]: r["images_per_second"] for r in folders["rows"] if r["path"] == "before"}
    for r in folders["rows"]:
        lines.append(
            f"| {r['image_size']} | {r['path']} | {_fmt(r['seconds'])} | {r['images_per_second']:.1f} | "
            f"{r['projected_minutes']:.1f} min | {r['images_per_second'] / before[r['image_size']]:.1f}x |"
        )
    lines += [
        "",
        "Draft mode against a full decode, on the prepared pixels (0..255 levels, every pixel of every image):",
        "",
        "| target | max | mean | share over 2 levels |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {d['image_size']} | {d['max_levels']} | {d['mean_levels']:.3f} | {d['share_over_2_levels']:.2%} |"
        for d in folders["draft_difference"]
    ]
    return lines


def _header(bench: dict) -> list[str]:
    lines: list[str] = []
    m = bench["machine"]
    lines += [
        f"Measured {bench['date']} at commit `{bench['commit']}` on {m['cpus']} CPU cores ({m['processor']}), "
        f"TensorFlow {bench.get('tensorflow')}, by `make bench` ({bench['seconds'] / 60:.1f} min). Timed figures: "
        "median [min, max] over the repetitions counted in the table; ratios compare medians of one run.",
    ]
    return lines


def _compute(bench: dict) -> list[str]:
    lines: list[str] = []
    mm, fw = bench["matmul"], bench["forward"]
    lines += [
        "",
        "## Compute",
        "",
        f"- float32 matmul {mm['n']}x{mm['n']}: **{mm['gflops']:.1f} GFLOP/s** "
        f"(seconds {_fmt(mm['seconds'], 3)}, n={mm['seconds']['n']})",
        f"- VGG16 conv base forward at {fw['image_size']}x{fw['image_size']}: {fw['gflop_per_image']:.3f} GFLOP "
        "per image",
        "",
        f"| batch size | images | seconds | images/s | efficiency (vs matmul) | features identical to batch "
        f"{fw['batches'][0]['batch_size']} |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for row in fw["batches"]:
        lines.append(
            f"| {row['batch_size']} | {row['images']} | {_fmt(row['seconds'])} (n={row['seconds']['n']}) "
            f"| {row['images_per_second']:.0f} | {row['efficiency']:.0%} | {row['identical_to_first']} |"
        )
    return lines


def _strategies(bench: dict, title: str = "Strategies: the pipeline vs a naive `model.fit`") -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        f"## {title}",
        "",
        "Naive: the whole Keras model with the strategy's layers frozen, `model.fit` on NumPy arrays, then "
        "predicting the test set (the way the tutorials do it). Pipeline: `fit.fit_variant` (cached "
        "frozen prefix when the strategy has one; tf.data input). Epoch seconds: median [min, max] of epochs "
        f"2-{bench['strategies'][0]['epochs']} of one run. Run: build, fit "
        f"{bench['strategies'][0]['epochs']} epochs, predict test; cold = feature cache empty, warm = a second "
        "seed reusing the features. Budget: the strategy's whole default `dvc repro` budget "
        "(tune trials + seeds), estimated from the measured epoch, run and extraction times. FLOP bound: the "
        "largest epoch speed-up caching can give (FLOPs of a naive epoch / FLOPs of a pipeline epoch).",
        "",
        "| strategy | path | naive s/epoch | pipeline s/epoch | epoch speed-up | FLOP bound | naive run s "
        "| pipeline run s (cold / warm) | run speed-up (cold / warm) | budget speed-up |",
        "|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for row in bench["strategies"]:
        warm = f"{row['pipeline_run_warm']:.1f}" if row["pipeline_run_warm"] else "—"
        warm_x = f"{row['run_speedup_warm']:.1f}x" if row["run_speedup_warm"] else "—"
        lines.append(
            f"| {row['variant']} | {row['path']} | {_fmt(row['naive_epoch'])} | {_fmt(row['pipeline_epoch'])} "
            f"| **{row['epoch_speedup']:.1f}x** | {bench['flop_bound'][row['variant']]:.3g}x "
            f"| {row['naive_run']:.1f} | {row['pipeline_run_cold']:.1f} / {warm} "
            f"| {row['run_speedup_cold']:.1f}x / {warm_x} | {row['budget']['speedup']:.1f}x |"
        )
    scratch = next((r for r in bench["strategies"] if r["variant"] == "scratch"), None)
    if scratch:
        overhead = scratch["pipeline_epoch"]["median"] / scratch["naive_epoch"]["median"] - 1
        lines += [
            "",
            f"Pipeline overhead (scratch, the same model trained end to end both ways): "
            f"{scratch['pipeline_epoch']['median']:.2f} s vs {scratch['naive_epoch']['median']:.2f} s "
            f"per epoch, **{overhead:+.1%}** (goal: within 10%).",
        ]
    return lines


def _tuning(tune: dict) -> list[str]:
    lines: list[str] = []
    t0 = tune["rows"][0]
    lines += [
        "",
        "## Tuning",
        "",
        f"Measured {tune['date']} at commit `{tune['commit']}` by `make bench-tune`: the tune stage's "
        f"objective, {t0['trials']} trials per strategy (the space-filling start-up design) under the training "
        "rule (early stopping), in-memory Optuna storage, features extracted beforehand. No pruning: every "
        "trial trains until the rule stops it. One study each (n=1). The default `dvc repro`'s own tuning is "
        "in the end-to-end section.",
        "",
        "| strategy | trials | epochs run | seconds | trials/min |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in tune["rows"]:
        lines.append(
            f"| {row['variant']} | {row['trials']} | {row['epochs_run']} | {row['seconds']:.0f} | "
            f"{row['trials_per_minute']:.1f} |"
        )
    return lines


def _large_study(bench: dict) -> list[str]:
    lines: list[str] = []
    ls = bench["large_study"]
    syn = ls["synthetic"]
    lines += [
        "",
        f"## A {ls['image_size']}x{ls['image_size']} study of {ls['images']:,} images",
        "",
        f"Feature cache on disk per strategy (float32, all splits; {ls['disk_free_gb']:.0f} GB free here):",
        "",
        "| strategy | cut after | feature shape | GB |",
        "|---|---|---|---:|",
    ]
    for variant, d in ls["disk"].items():
        lines.append(
            f"| {variant} | {d['cut']} | {tuple(d['shape'])} | {d['gb']:.1f} |"
            if d
            else f"| {variant} | — (trains end to end) | — | 0 |"
        )
    lines += [
        "",
        f"Synthetic run: frozen-strategy features of {syn['train_images']:,} images "
        f"({tuple(syn['shape'])}, {syn['file_gb']:.2f} GB) written to a memory-mapped file in "
        f"{syn['write_seconds']:.1f} s, then one epoch of head training "
        f"{'streamed from it' if syn['streamed'] else 'from an in-memory copy'} in {syn['epoch_seconds']:.1f} s. "
        f"Heap (anonymous) memory: {syn['rss_anon_before_mb']:.0f} MB before, peak {syn['rss_anon_peak_mb']:.0f} "
        f"MB during. File-backed resident pages (libraries, then the memory map through the page cache, "
        f"reclaimable): {syn['rss_file_before_mb']:.0f} MB before, peak {syn['rss_file_peak_mb']:.0f} MB. "
        f"Copying the features into memory would have added {syn['file_gb'] * 1e9 / 2**20:.0f} MB of heap.",
    ]
    if "study_cost" in ls:
        st = ls["study"]
        lines += [
            "",
            f"What a full study costs here: {st['classes']} classes x ({st['train_per_class']} train + "
            f"{st['val_per_class']} val + {st['test_per_class']} test) images at {ls['image_size']}x"
            f"{ls['image_size']}, {st['seeds']} seeds x {st['epochs']} epochs, tuning {st['tune_trials']} trials "
            f"x {st['tune_epochs']} epochs per strategy (no pruning), from seconds per image measured at "
            f"{ls['image_size']}x{ls['image_size']} (batches of 8, random weights; one training step or forward "
            "pass of what the strategy runs):",
            "",
            "| strategy | s/image training | s/image forward | one epoch, h | feature extraction, h "
            "| whole budget, h |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for variant, cost in ls["study_cost"].items():
            per = ls["per_image"][variant]
            lines.append(
                f"| {variant} | {per['train']:.3f} | {per['forward']:.3f} | {cost['epoch_hours']:.2f} "
                f"| {cost['extraction_hours']:.2f} | {cost['hours']:.0f} |"
            )
        total = sum(c["hours"] for c in ls["study_cost"].values())
        lines += ["", f"All strategies: about {total:.0f} hours ({total / 24:.1f} days) on this 2-core machine."]
    return lines


def _end_to_end(e2e: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        "## End to end: `dvc repro`",
        "",
        f"Measured {e2e['date']} at commit `{e2e['commit']}` by `make bench-e2e`: a temporary git copy of the "
        "repository, clean outputs (no feature cache, no Optuna journals, new MLflow store).",
        "",
        f"- clean `dvc repro`: **{e2e['clean_seconds'] / 60:.1f} min** (n=1)",
        f"- no-op `dvc repro`: **{_fmt(e2e['noop_seconds'])} s** (n={e2e['noop_seconds']['n']})",
        f"- peak resident memory of any process: **{e2e['peak_rss_mb_all_stages'] / 1024:.2f} GB**",
        "",
        "| stage | seconds | peak RSS MB |",
        "|---|---:|---:|",
    ]
    for record in e2e["stages"]:
        peak = max(record["max_rss_mb"], record["max_rss_children_mb"])
        lines.append(f"| {_stage_name(record['argv'])} | {record['seconds']:.0f} | {peak:.0f} |")
    lines += [
        "",
        "Tuning inside that run (the default budget, every trial under the training rule, cut at the halving "
        "rung when it ranks low there):",
        "",
        "| strategy | trials (cut at the rung) | epochs run | trial seconds | trials/min | chosen learning rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, t in e2e["tuning"].items():
        edge = f" (at the {t['learning_rate_at_edge']} edge)" if t.get("learning_rate_at_edge") else ""
        rate = t.get("learning_rate", float("nan"))
        lines.append(
            f"| {variant} | {t['trials']} ({t.get('pruned_trials', 0)}) | {t['epochs_run']} | "
            f"{t['trial_seconds']:.0f} | {t['trials_per_minute']:.1f} | {rate:.2g}{edge} |"
        )
    return lines


def _numerics(numerics: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        "## Options that change numerics (off by default)",
        "",
        f"Measured {numerics['date']} at commit `{numerics['commit']}` by `make bench-numerics`: `fit_variant` "
        "with `train.jit_compile: true` (XLA) or `train.mixed_precision: true` (bfloat16 compute) against "
        "the default float32, same seed and data, 3 epochs; seconds per epoch over epochs 2-3.",
        "",
        "| strategy | option | s/epoch | vs float32 | largest change in val accuracy |",
        "|---|---|---|---:|---:|",
    ]
    reference: dict[str, float] = {}
    for row in numerics["rows"]:
        base = reference.setdefault(row["variant"], row["epoch"]["median"])
        lines.append(
            f"| {row['variant']} | {row['option']} | {_fmt(row['epoch'])} | "
            f"{row['epoch']['median'] / base:.2f}x | {row['max_val_accuracy_change']:.3f} |"
        )
    return lines
