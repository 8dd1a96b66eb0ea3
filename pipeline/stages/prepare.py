"""Stage `prepare`: raw images -> stratified, seeded train/val/test arrays.

Reads `seed` and `data.*` from params.yaml and the raw source (Fashion-MNIST IDX files, or a
folder with one sub-folder per class). Writes, atomically, into `--out` (data/prepared):
  train.npz, val.npz, test.npz   images uint8 (N, size, size, 3) RGB 0-255, labels int64 (N,)
  classes.json                   class names, index = label
  summary.json                   source, counts per class and split, sha256 of every array; for
                                 an image folder also what was left out (`folder`: junk,
                                 non-images, duplicates; `unreadable_skipped`), the images each
                                 class had, upscaled and converted images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.core.params import load_params
from pipeline.core.splits import Prepared, prepare
from pipeline.runtime.atomic import atomic_dir, ensure_writable, write_json
from pipeline.runtime.cli import run_stage


def write_prepared(prepared: Prepared, out_dir: Path) -> None:
    """Write all outputs into `out_dir` at once: either all of them appear, or none change."""
    with atomic_dir(out_dir) as tmp:
        for split, (images, labels) in prepared.splits.items():
            np.savez(tmp / f"{split}.npz", images=images, labels=labels)
        write_json(tmp / "classes.json", prepared.class_names, sort_keys=False)
        write_json(tmp / "summary.json", prepared.summary, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="params file")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ensure_writable(Path(args.out).parent, "--out")
    prepared = prepare(params.data, params.seed)
    write_prepared(prepared, Path(args.out))
    totals = prepared.summary["totals"]
    print(
        f"prepared {params.data.source}: {len(prepared.class_names)} classes, "
        f"{totals['train']} train / {totals['val']} val / {totals['test']} test images "
        f"at {params.data.image_size}x{params.data.image_size} -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
