"""Reading an image folder of camera-size photos: the old path against the one prepare uses.

  python -m pipeline.tools.bench --folders   # about 3 minutes

Generates `FILES` JPEGs of 4000x3000 (random colour detail at every scale with sensor-like noise,
quality 90, as a phone writes them) in three class folders, then reads them to `data.image_size` and 224:

  before         every file decoded in full twice (a readability check, then the load), one core:
                 what prepare did until issue 28
  one decode     decoded in full once, one core
  draft          once, JPEG draft mode (DCT scaling), one core
  pipeline       once, draft mode, one process per core (`folders.decode_files`, what prepare runs)

and how far draft mode moves the prepared pixels from a full decode (0..255 levels).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import folders, images
from pipeline.tools.bench.measure import timed

FILES = 48
CAMERA = (4000, 3000)
PROJECTED = 10_000


def camera_scene(rng: np.random.Generator, size: tuple[int, int] = CAMERA) -> np.ndarray:
    """uint8 (height, width, 3): colour detail at every scale plus sensor noise, so that JPEG
    coding and DCT scaling see what they see in a photo (a smooth gradient would hide errors)."""
    scene = np.full((size[1], size[0], 3), 128.0, np.float32)
    for octave, amplitude in ((16, 90.0), (64, 40.0), (256, 20.0), (1000, 10.0)):
        coarse = rng.normal(0, amplitude, size=(octave * 3 // 4, octave, 3)).astype(np.float32)
        layers = [Image.fromarray(coarse[..., c], "F").resize(size, Image.Resampling.BICUBIC) for c in range(3)]
        scene += np.stack([np.asarray(layer) for layer in layers], axis=-1)
    scene += rng.normal(0, 4, size=scene.shape).astype(np.float32)
    return np.clip(scene, 0, 255).astype(np.uint8)


def write_camera_folder(root: Path, files: int, seed: int = 0) -> list[Path]:
    """`files` camera-size JPEGs (quality 90) in three class folders: shifted copies of a few
    generated scenes (a scene takes seconds to generate), every file different; returns their paths."""
    rng = np.random.default_rng(seed)
    scenes = [camera_scene(rng) for _ in range(min(files, 4))]
    paths = []
    for i in range(files):
        folder = root / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"IMG_{i:04d}.jpg"
        Image.fromarray(np.roll(scenes[i % len(scenes)], 97 * i, axis=1)).save(path, quality=90)
        paths.append(path)
    return paths


def _before(paths: list[Path], image_size: int) -> None:
    for path in paths:
        images.decode(path)  # the old readability check
        image, _ = images.decode(path)
        np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))


def measure(image_sizes: tuple[int, ...], repeats: int, files: int = FILES) -> dict:
    """Images per second of each path at each target size, and draft mode's pixel difference."""
    workers = len(os.sched_getaffinity(0))
    rows, differences = [], []
    with tempfile.TemporaryDirectory(prefix="vgg16-bench-folders-") as work:
        paths = write_camera_folder(Path(work), files)
        for size in image_sizes:
            paths_by = {
                "before": lambda s=size: _before(paths, s),
                "one decode": lambda s=size: folders.decode_files(paths, s, workers=1, draft=False),
                "draft": lambda s=size: folders.decode_files(paths, s, workers=1),
                "pipeline": lambda s=size: folders.decode_files(paths, s),
            }
            for name, run in paths_by.items():
                seconds, _ = timed(run, repeats)
                rate = files / seconds["median"]
                rows.append(
                    {
                        "path": name,
                        "image_size": size,
                        "files": files,
                        "seconds": seconds,
                        "images_per_second": rate,
                        "projected_minutes": PROJECTED / rate / 60,
                    }
                )
                print(f"[bench] folders {name} at {size}: {rate:.1f} images/s", flush=True)
            full = np.stack([d.pixels for d in folders.decode_files(paths, size, draft=False)]).astype(int)
            draft = np.stack([d.pixels for d in folders.decode_files(paths, size)]).astype(int)
            gap = np.abs(full - draft)
            differences.append(
                {
                    "image_size": size,
                    "max_levels": int(gap.max()),
                    "mean_levels": float(gap.mean()),
                    "share_over_2_levels": float(np.mean(gap > 2)),
                }
            )
    return {"camera": list(CAMERA), "workers": workers, "projected_images": PROJECTED, "rows": rows,
            "draft_difference": differences}  # fmt: skip
