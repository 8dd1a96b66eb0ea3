"""Print the strategies of params.yaml with their parameter counts, as Markdown tables: the main
comparison's (`variants`) and the parameter-efficient study's (`studies.parameter_efficient`).

`python -m pipeline.tools.describe [--params params.yaml]`. Reads only params (no data, no weights:
counts do not depend on weight values); the README's strategy tables are this command's output.
"""

from __future__ import annotations

import argparse

from pipeline.core.params import Params, load_params
from pipeline.core.vgg16 import BLOCKS, FULL_BASE, kept_layers, kind_words
from pipeline.runtime.cli import run_stage


def variant_rows(params: Params, num_classes: int, strategies: dict | None = None) -> list[dict]:
    """One row per strategy of `strategies` (default: `params.variants`): name, weights, trainable
    conv layers and parameters, and parameter counts."""
    from pipeline.core.model import ModelSpec, build_model, count_parameters  # deferred: imports TensorFlow

    rows = []
    for name, variant in (params.variants if strategies is None else strategies).items():
        trainable_layers = variant.layers
        spec = ModelSpec(
            image_size=params.data.image_size,
            num_classes=num_classes,
            trainable_layers=trainable_layers,
            cut_after=variant.cut_after,
            pooling=params.model.pooling,
            head_units=params.model.head_units,
            dropout=params.model.dropout,
            head_norm=params.model.head_norm,
            parameters=variant.parameters,
            lora_rank=variant.lora_rank,
        )
        model = build_model(spec, None)
        rows.append(
            {
                "variant": name,
                "weights": variant.weights or params.model.weights,
                "cut_after": variant.cut_after,
                "trains": _describe(
                    trainable_layers, variant.cut_after, kind_words(variant.parameters, variant.lora_rank)
                ),
                **count_parameters(model),
            }
        )
    return rows


def _describe(trainable_layers: frozenset[str], cut_after: str = FULL_BASE, kind: str = "") -> str:
    if not trainable_layers:
        return "head only"
    if trainable_layers == frozenset(kept_layers(cut_after)):
        if not kind:
            return "everything" if cut_after == FULL_BASE else "every kept layer + head"
        where = "every conv layer"
    else:
        parts = []
        for block, layers in BLOCKS.items():
            chosen = [layer for layer in layers if layer in trainable_layers]
            parts.append(block if len(chosen) == len(layers) else ", ".join(chosen))
        where = " + ".join(p for p in parts if p)
    return f"{where}: {kind} + head" if kind else f"{where} + head"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--num-classes", type=int, default=10, help="classes in the data (default: %(default)s, Fashion-MNIST)"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    size = params.data.image_size
    print(
        f"Parameter counts at {size}x{size}, {args.num_classes} classes, head: {params.model.pooling}"
        f" -> {params.model.head_norm} -> Dense({params.model.head_units}) -> Dense({args.num_classes}) "
        "(the head's normalisation statistics count as non-trainable)\n"
    )
    _table(variant_rows(params, args.num_classes))
    study = params.studies.parameter_efficient.strategies
    if study:
        print("\nThe parameter-efficient study's strategies (studies.parameter_efficient):\n")
        _table(variant_rows(params, args.num_classes, study))


def _table(rows: list[dict]) -> None:
    print("| strategy | weights | base cut after | trains | trainable | non-trainable | total |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        counts = f"{r['trainable']:,} | {r['non_trainable']:,} | {r['total']:,}"
        cut = "— (whole base)" if r["cut_after"] == FULL_BASE else r["cut_after"]
        print(f"| {r['variant']} | {r['weights']} | {cut} | {r['trains']} | {counts} |")


if __name__ == "__main__":
    run_stage(main)
