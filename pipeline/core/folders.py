"""Image folders as real ones arrive: one sub-folder per class, plus whatever a Mac, a Jupyter
session, a phone or a scraper left beside the images.

  what                                       what happens (counted in summary.json `folder`)
  hidden files and folders at any depth      never read: `.*` (macOS `._*` resource forks,
  (`.*`), `__MACOSX/`, `Thumbs.db`,          `.DS_Store`, `.ipynb_checkpoints/`, `.git/`), the
  `desktop.ini`                              folder macOS zips add, Windows' thumbnail caches
  files without an image suffix, files       ignored
  beside the class folders
  images in a non-hidden sub-folder of a     belong to the class (a class folder is often sorted
  class folder                               further, by source or date); counted
  files that do not decode                   stop the stage with a list, or skipped with
                                             `data.skip_unreadable: true`
  exact duplicates (identical pixels once    one copy kept, the first path in sorted order: a
  resized to `data.image_size`, what the     repeated picture adds nothing to train on and would
  network sees)                              count twice in validation or test; so no duplicate
                                             crosses a split
  the same picture under two classes         a labelling conflict: an error naming the files
                                             (the data cannot say which label is right)

Every file is read and decoded once, in a pool of one process per core; a JPEG is decoded with
PIL's draft mode (DCT scaling) to the smallest size still at least `DRAFT_FACTOR` x the target
side, which the bilinear resize then reduces (README "Data" and `make bench-folders` have the
measured difference).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import images
from pipeline.runtime.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OS_METADATA = ("thumbs.db", "desktop.ini")  # compared lower-case: Windows writes both spellings
# the draft keeps at least 4x the target side: on photos, 4x moved the prepared pixels by 0.1-0.15
# levels on average (the resize's own rounding); 2x moved them more at 224
DRAFT_FACTOR = 4
COUNTS = {  # summary.json `folder` (every key, 0 when none) -> how the report's data caveat says it
    "duplicates_removed": "duplicate pictures removed (one copy kept)",
    "byte_identical_files": "byte-identical files",
    "macos_resource_forks": "macOS resource forks (._*)",
    "macosx_folders": "__MACOSX folders",
    "hidden_files": "hidden files",
    "hidden_folders": "hidden folders (.ipynb_checkpoints, ...)",
    "files_in_junk_folders": "files inside those folders",
    "os_metadata_files": "Thumbs.db / desktop.ini files",
    "non_image_files": "non-image files",
    "files_outside_class_folders": "files beside the class folders",
    "images_in_subfolders": "images read from sub-folders of a class",
}
PARALLEL_FROM = 32  # fewer files: starting the pool (about a second) costs more than it saves


@dataclass
class Decoded:
    """One file's outcome: the prepared pixels, or why there are none."""

    pixels: np.ndarray | None  # uint8 (size, size, 3)
    kinds: list[str]
    upscaled: bool
    file_sha256: str


@dataclass
class ImageFolder:
    """The decoded, de-duplicated images of a class-per-sub-folder dataset, and what was left out."""

    class_names: list[str]
    pixels: np.ndarray  # uint8 (N, size, size, 3)
    labels: np.ndarray  # int64 (N,)
    paths: list[str]  # relative to the root, sorted within each class
    upscaled: np.ndarray  # bool (N,): smaller than the target on either side
    kinds: list[list[str]]  # per image, the `images.KINDS` of conversion it needed
    counts: dict = field(default_factory=dict)  # summary.json `folder`
    unreadable: list[str] = field(default_factory=list)


def junk_kind(name: str, is_dir: bool) -> str | None:
    """The `folder` count a junk file or folder name goes to, or None for a name that may hold data."""
    if name == "__MACOSX" and is_dir:
        return "macosx_folders"
    if name.startswith("._"):
        return "macos_resource_forks"
    if name.startswith("."):
        return "hidden_folders" if is_dir else "hidden_files"
    if name.lower() in OS_METADATA and not is_dir:
        return "os_metadata_files"
    return None


def _count_junk_folder(path: Path, kind: str, counts: Counter) -> None:
    counts[kind] += 1
    counts["files_in_junk_folders"] += sum(len(files) for _, _, files in os.walk(path))


def list_class_files(class_dir: Path, root: Path, counts: Counter) -> list[Path]:
    """The image files under `class_dir` at any depth, sorted by relative path; junk is pruned
    without being opened (a junk folder counts once, and the files inside it in
    `files_in_junk_folders`) and non-images are counted."""
    found = []
    for current, dirs, files in os.walk(class_dir):
        for name in list(dirs):
            kind = junk_kind(name, is_dir=True)
            if kind:
                dirs.remove(name)
                _count_junk_folder(Path(current) / name, kind, counts)
        for name in files:
            path = Path(current) / name
            kind = junk_kind(name, is_dir=False)
            if kind:
                counts[kind] += 1
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                counts["non_image_files"] += 1
            else:
                found.append(path)
                counts["images_in_subfolders"] += Path(current) != class_dir
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def decode_file(path: Path, image_size: int, draft: bool = True) -> Decoded:
    """Read and decode one file once: the prepared pixels (bilinear resize to `image_size`) and
    the sha256 of its bytes; pixels None when it does not decode. `draft=False` decodes a JPEG
    at full size (the benchmark's reference)."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        image, kinds = images.decode(io.BytesIO(raw), draft=DRAFT_FACTOR * image_size if draft else None)
    except images.DECODE_ERRORS:
        return Decoded(None, [], False, digest)
    upscaled = image.width < image_size or image.height < image_size
    pixels = np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return Decoded(pixels, kinds, upscaled, digest)


def _decode_chunk(paths: list[Path], image_size: int, draft: bool) -> list[Decoded]:
    return [decode_file(path, image_size, draft) for path in paths]


def decode_files(paths: list[Path], image_size: int, workers: int | None = None, draft: bool = True) -> list[Decoded]:
    """`decode_file` for every path, in order, over `workers` processes (default: the cores this
    process may use). Spawned, not forked: the parent may hold threads that a fork would copy."""
    workers = workers or len(os.sched_getaffinity(0))
    if workers == 1 or len(paths) < PARALLEL_FROM:
        return _decode_chunk(paths, image_size, draft)
    size = max(1, min(16, len(paths) // (4 * workers)))  # small chunks: camera photos take 0.1 s each
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = pool.map(_decode_chunk, chunks, [image_size] * len(chunks), [draft] * len(chunks))
        return [decoded for chunk in done for decoded in chunk]


def read_image_folder(root: Path, image_size: int, skip_unreadable: bool, workers: int | None = None) -> ImageFolder:
    """Scan, decode and de-duplicate `root/<class>/...`. Raises DataError naming the fix."""
    if not root.is_dir():
        raise DataError(
            f"data.directory: {root} does not exist or is not a folder; create it with one sub-folder per class"
        )
    counts: Counter = Counter()
    class_dirs = []
    for entry in sorted(root.iterdir()):
        kind = junk_kind(entry.name, entry.is_dir())
        if kind and entry.is_dir():
            _count_junk_folder(entry, kind, counts)
        elif kind:
            counts[kind] += 1
        elif entry.is_dir():
            class_dirs.append(entry)
        else:
            counts["files_outside_class_folders"] += 1
    if len(class_dirs) < 2:
        raise DataError(
            f"data.directory: {root} has {len(class_dirs)} class folder(s); a classifier needs at least 2 "
            "sub-folders (one per class, the folder name is the class name)"
        )
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = list_class_files(class_dir, root, counts)
        files += found
        labels += [label] * len(found)
    decoded = decode_files(files, image_size, workers)
    relative = [path.relative_to(root).as_posix() for path in files]
    unreadable = [name for name, d in zip(relative, decoded, strict=True) if d.pixels is None]
    if unreadable and not skip_unreadable:
        listed = "\n  ".join(unreadable)
        raise DataError(
            f"{len(unreadable)} image file(s) under {root} cannot be decoded:\n  {listed}\n"
            "Fix or delete them, or set data.skip_unreadable: true to skip them (they are counted in summary.json)"
        )
    keep = _first_copies(relative, labels, decoded, [d.name for d in class_dirs])
    counts["duplicates_removed"] = sum(d.pixels is not None for d in decoded) - len(keep)
    counts["byte_identical_files"] = len(decoded) - len({d.file_sha256 for d in decoded})
    for label, class_dir in enumerate(class_dirs):
        if not any(labels[i] == label for i in keep):
            raise DataError(
                f"data.directory: class folder {class_dir} has no readable images; add images or remove the folder"
            )
    return ImageFolder(
        class_names=[d.name for d in class_dirs],
        pixels=np.stack([decoded[i].pixels for i in keep]),
        labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
        paths=[relative[i] for i in keep],
        upscaled=np.asarray([decoded[i].upscaled for i in keep], dtype=bool),
        kinds=[decoded[i].kinds for i in keep],
        counts={name: counts[name] for name in COUNTS},
        unreadable=unreadable,
    )


def _first_copies(relative: list[str], labels: list[int], decoded: list[Decoded], class_names: list[str]) -> list[int]:
    """Indices of the files to keep: the first of every group of identical prepared pixels.
    Raises DataError listing every group that spans two classes."""
    groups: dict[bytes, list[int]] = {}
    for i, d in enumerate(decoded):
        if d.pixels is not None:
            groups.setdefault(hashlib.sha256(d.pixels.tobytes()).digest(), []).append(i)
    conflicts = [members for members in groups.values() if len({labels[i] for i in members}) > 1]
    if conflicts:
        listed = "\n  ".join(
            " = ".join(f"{relative[i]} ({class_names[labels[i]]})" for i in members) for members in conflicts
        )
        raise DataError(
            f"{len(conflicts)} picture(s) appear under two or more classes (identical pixels at "
            f"data.image_size):\n  {listed}\nA picture has one label: delete or move the wrong copies"
        )
    return sorted(members[0] for members in groups.values())
