"""Image folders as real ones arrive: junk from a Mac, Jupyter and Windows is ignored and counted,
exact duplicates never cross a split, a picture under two classes stops the stage, camera-size
JPEGs decode once (draft mode within 2 levels of a full decode), in parallel."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.core import folders
from pipeline.core.images import _draft_scale
from pipeline.tools.bench.folders import camera_scene
from tests.conftest import run_stage
from tests.test_bad_inputs import assert_nothing_written, assert_rejected

CHANNEL = {"red": 0, "green": 1, "blue": 2}  # each class's pictures are dominated by its channel
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def _picture(rng, colour: str, size=(40, 40)) -> Image.Image:
    pixels = rng.integers(0, 80, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[..., CHANNEL[colour]] += 170
    return Image.fromarray(pixels)


@pytest.fixture
def messy_folder(tmp_path):
    """Three classes of six distinct pictures, plus every trap of a folder copied from a Mac, out
    of a Jupyter session, from Windows and by hand; what each adds is in the comments."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for colour in CHANNEL:
        (root / colour).mkdir(parents=True)
        for i in range(6):
            _picture(rng, colour).save(root / colour / f"img{i:03d}.png")
    (root / "red" / "._img000.png").write_bytes(APPLEDOUBLE)  # resource fork with an image suffix
    (root / "__MACOSX" / "red").mkdir(parents=True)  # the folder macOS zips carry
    (root / "__MACOSX" / "red" / "._img000.png").write_bytes(APPLEDOUBLE)
    (root / ".DS_Store").write_bytes(b"Bud1" + bytes(32))
    (root / "red" / ".DS_Store").write_bytes(b"Bud1" + bytes(32))
    (root / "red" / ".ipynb_checkpoints").mkdir()  # a green picture: read as red, it would be mislabelled
    shutil.copy(root / "green" / "img001.png", root / "red" / ".ipynb_checkpoints" / "img001-checkpoint.png")
    (root / "green" / "Thumbs.db").write_bytes(bytes(64))
    (root / "blue" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    shutil.copy(root / "red" / "img002.png", root / "red" / "img002 copy.png")  # the same bytes twice
    Image.open(root / "blue" / "img003.png").save(root / "blue" / "img003_again.png", compress_level=1)  # same pixels
    (root / "blue" / "extra").mkdir()  # a non-hidden sub-folder: its pictures belong to the class
    _picture(rng, "blue").save(root / "blue" / "extra" / "img100.png")
    green_photo = camera_scene(rng, (2048, 1536))
    green_photo[..., 1] = np.maximum(green_photo[..., 1], 230)
    Image.fromarray(green_photo).save(root / "green" / "IMG_0001.jpg", quality=90)
    return root


def _prepare(tmp_path, write_params, root, per_class=(3, 1, 1)):
    train, val, test = per_class
    data = {"source": "directory", "directory": str(root), "image_size": 32}
    data.update(train_per_class=train, val_per_class=val, test_per_class=test)
    params = write_params({"data": data})
    out = tmp_path / "prepared"
    return run_stage("prepare", "--params", params, "--out", out, timeout=300), out


def test_a_messy_folder_prepares_with_junk_counted_duplicates_removed_and_every_label_right(
    tmp_path, write_params, messy_folder
):
    result, out = _prepare(tmp_path, write_params, messy_folder, per_class=(4, 1, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folder"] == {
        "byte_identical_files": 1,  # img002 copy.png
        "duplicates_removed": 2,  # img002 copy.png, img003_again.png
        "files_in_junk_folders": 2,  # the checkpoint copy, the resource fork under __MACOSX
        "files_outside_class_folders": 0,
        "hidden_files": 2,  # .DS_Store twice
        "hidden_folders": 1,  # .ipynb_checkpoints
        "images_in_subfolders": 1,  # blue/extra/img100.png
        "macos_resource_forks": 1,
        "macosx_folders": 1,
        "non_image_files": 0,
        "os_metadata_files": 2,  # Thumbs.db, desktop.ini
    }
    assert summary["available_per_class"] == {"blue": 7, "green": 7, "red": 6}
    assert summary["class_imbalance"] == pytest.approx(7 / 6)
    classes = json.loads((out / "classes.json").read_text())
    seen: dict[bytes, str] = {}
    for split in ("train", "val", "test"):
        with np.load(out / f"{split}.npz") as arrays:
            for image, label in zip(arrays["images"], arrays["labels"], strict=True):
                # every prepared picture carries the class of the folder it came from
                assert image.reshape(-1, 3).mean(axis=0).argmax() == CHANNEL[classes[label]]
                digest = hashlib.sha256(image.tobytes()).digest()
                assert digest not in seen, f"a picture in {split} is also in {seen.get(digest)}"
                seen[digest] = split
    assert len(seen) == 3 * 6


def test_a_picture_under_two_classes_stops_with_both_files(tmp_path, write_params, messy_folder):
    shutil.copy(messy_folder / "green" / "img004.png", messy_folder / "red" / "img004 (1).png")
    result, out = _prepare(tmp_path, write_params, messy_folder)
    assert_rejected(
        result,
        "1 picture(s) appear under two or more classes",
        "green/img004.png (green) = red/img004 (1).png (red)",
        "delete or move the wrong copies",
    )
    assert_nothing_written(out)


def test_a_class_short_of_images_after_duplicates_names_it_and_the_keys(tmp_path, write_params, messy_folder):
    result, out = _prepare(tmp_path, write_params, messy_folder, per_class=(5, 1, 1))
    assert_rejected(
        result,
        "class 'red' has 6 images in the image folder (after junk, unreadable files and duplicates",
        "data.train_per_class 5",
        "sum to at most 6",
    )
    assert_nothing_written(out)


def test_draft_decoding_of_a_camera_photo_is_within_rounding_of_a_full_decode(tmp_path):
    photo = tmp_path / "IMG_0001.jpg"
    Image.fromarray(camera_scene(np.random.default_rng(1), (2048, 1536))).save(photo, quality=90)
    for size in (32, 224):
        full = folders.decode_file(photo, size, draft=False).pixels.astype(int)
        drafted = folders.decode_file(photo, size).pixels.astype(int)
        assert full.shape == drafted.shape == (size, size, 3)
        gap = np.abs(full - drafted)
        assert gap.max() <= 2 and gap.mean() < 0.3  # a partial DCT block at the edge gave up to 20


def test_draft_scales_divide_both_sides_and_keep_the_smallest_side():
    assert _draft_scale((4000, 3000), 128) == 8  # 500 x 375
    assert _draft_scale((4000, 3000), 896) == 2  # 1/4 would leave 750 < 896
    assert _draft_scale((4000, 2650), 128) == 2  # 2650 is not a multiple of 4: a partial DCT block
    assert _draft_scale((3999, 2999), 32) == 1
    assert _draft_scale((640, 480), 224) == 2 and _draft_scale((640, 480), 4 * 224) == 1


def test_decoding_in_a_process_pool_gives_what_one_process_gives(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(folders.PARALLEL_FROM + 3):
        paths.append(tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}")
        _picture(rng, "red", (48 + i, 40)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    paths.append(tmp_path / "broken.png")
    serial = folders.decode_files(paths, 32, workers=1)
    parallel = folders.decode_files(paths, 32, workers=2)
    assert [d.file_sha256 for d in serial] == [d.file_sha256 for d in parallel]
    assert serial[-1].pixels is None and parallel[-1].pixels is None
    for one, other in zip(serial[:-1], parallel[:-1], strict=True):
        np.testing.assert_array_equal(one.pixels, other.pixels)
        assert (one.kinds, one.upscaled) == (other.kinds, other.upscaled)
