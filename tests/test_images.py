"""Every image arrives as an image viewer shows it: one small file of each kind (PIL mode, bit
depth, transparency, colour profile, EXIF orientation, animation) with known content, prepared
through `python -m pipeline.stages.prepare`, and the prepared pixels compared value by value."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import KINDS, decode
from tests.conftest import REPO, cli, run_stage

S = 32  # the prepared size: files are written at it, so no resampling blurs the expected values
LEFT = np.s_[:, : S // 2]


def _solid(colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (S, S, 3)).copy()


def _halves(left, right) -> np.ndarray:
    out = _solid(right)
    out[LEFT] = left
    return out


def _composite(colour, alpha: int) -> list[int]:
    """`colour` at `alpha` (0..255) over white, as PIL's alpha_composite rounds it."""
    return [round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in colour]


# --- writers for what PIL cannot save directly ------------------------------------------------


def _png_rgb16(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL reads these but cannot write them)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    height, width, _ = rgb16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _icc_swapping_red_and_blue() -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile whose red primary is sRGB's blue and whose
    blue primary is sRGB's red (D50-adapted sRGB colorants): a file tagged with it that stores pure
    red shows pure blue."""

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    def text_description(text):
        data = text.encode() + b"\0"
        return b"desc" + b"\0" * 4 + struct.pack(">I", len(data)) + data + b"\0" * 8 + b"\0" * 3 + b"\0" * 67

    gamma = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    tags = [
        (b"desc", text_description("red-blue swapped RGB")),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(*blue)),
        (b"gXYZ", xyz(*green)),
        (b"bXYZ", xyz(*red)),
        (b"rTRC", gamma),
        (b"gTRC", gamma),
        (b"bTRC", gamma),
        (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", offset + len(data))
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + data


def _lab_gray(l_byte: int) -> int:
    """sRGB value of the CIELAB neutral whose L* is l_byte / 255 * 100 (PIL's LAB encoding)."""
    lightness = l_byte / 255 * 100
    y = ((lightness + 16) / 116) ** 3 if lightness > 8 else lightness / 903.3
    encoded = 1.055 * y ** (1 / 2.4) - 0.055 if y > 0.0031308 else 12.92 * y
    return round(255 * encoded)


# --- the cases: (file name, writer, expected pixels, conversion kinds, tolerance) -----------------


def _cases():
    def save(image, **kw):
        return lambda path: image.save(path, **kw)

    def frames(*colours):
        return [Image.new("RGB", (S, S), c) for c in colours]

    def animated(colour, **kw):  # a first colour per case: identical pictures would be de-duplicated
        first, *rest = frames(colour, (10, 10, 250))
        return lambda path: first.save(path, save_all=True, append_images=rest, **kw)

    palette = Image.new("P", (S, S), 1)
    palette.putpalette([0, 0, 0, 12, 200, 40])
    transparent_palette = Image.new("P", (S, S), 1)
    transparent_palette.putpalette([0, 0, 0, 200, 30, 90])
    transparent_palette.paste(0, (0, 0, S // 2, S))
    palette_alpha = Image.new("PA", (S, S), (1, 255))
    palette_alpha.putpalette([0, 0, 0, 5, 5, 250])
    palette_alpha.paste((1, 0), (0, 0, S // 2, S))
    gray_alpha = Image.new("LA", (S, S), (100, 128))
    keyed = Image.fromarray(_halves((10, 20, 30), (0, 90, 0)))
    bilevel = Image.new("1", (S, S), 1)
    bilevel.paste(0, (0, 0, S // 2, S))
    i32_stretched = np.full((S, S), 5, np.int32)
    i32_stretched[LEFT] = -5
    i32_stretched[0, -1] = 0  # a third level: otherwise the same picture as the bilevel case
    i32_expected = _halves((0,) * 3, (255,) * 3)
    i32_expected[0, -1] = 128  # round(127.5), to even
    f32_stretched = np.full((S, S), 1000.0, np.float32)
    f32_stretched[LEFT] = 0.0
    f32_stretched[0, -1] = 250.0  # a third level, unlike int32_signed's
    f32_expected = _halves((1,) * 3, (254,) * 3)
    f32_expected[0, -1] = 64  # 250 / 1000 * 255 = 63.75
    upright = np.zeros((S // 2, S, 3), np.uint8)  # stored 32 wide x 16 high, left half white
    upright[:, : S // 2] = 255
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": shown 16 wide x 32 high, top half white
    rotated = np.zeros((S, S // 2, 3), np.uint8)
    rotated[: S // 2] = 255
    big_endian = Image.frombytes("I;16B", (S, S), np.full((S, S), 20000, ">u2").tobytes())

    return [
        ("rgb.png", save(Image.new("RGB", (S, S), (10, 120, 230))), _solid((10, 120, 230)), [], 0),
        ("rgb.bmp", save(Image.new("RGB", (S, S), (1, 2, 3))), _solid((1, 2, 3)), [], 0),
        ("rgb.jpg", save(Image.new("RGB", (S, S), (60, 160, 60)), quality=100), _solid((60, 160, 60)), [], 2),
        ("rgb.webp", save(Image.new("RGB", (S, S), (33, 66, 99)), lossless=True), _solid((33, 66, 99)), [], 0),
        ("gray.png", save(Image.new("L", (S, S), 77)), _solid((77,) * 3), [], 0),
        ("bilevel.png", save(bilevel), _halves((0,) * 3, (255,) * 3), ["bilevel"], 0),
        ("palette.gif", save(palette), _solid((12, 200, 40)), [], 0),
        (
            "palette_transparent.png",
            save(transparent_palette, transparency=0),
            _halves((255,) * 3, (200, 30, 90)),
            ["alpha_composited_on_white"],
            0,
        ),
        ("palette_alpha.tif", save(palette_alpha), _halves((255,) * 3, (5, 5, 250)), ["alpha_composited_on_white"], 0),
        ("gray_alpha.png", save(gray_alpha), _solid(_composite((100,) * 3, 128)), ["alpha_composited_on_white"], 1),
        (
            "rgba.png",
            save(Image.new("RGBA", (S, S), (255, 0, 0, 128))),
            _solid(_composite((255, 0, 0), 128)),
            ["alpha_composited_on_white"],
            1,
        ),
        (
            "rgb_colour_key.png",
            save(keyed, transparency=(10, 20, 30)),
            _halves((255,) * 3, (0, 90, 0)),
            ["alpha_composited_on_white"],
            0,
        ),
        ("cmyk.tif", save(Image.new("CMYK", (S, S), (0, 128, 0, 0))), _solid((255, 127, 255)), ["cmyk"], 0),
        ("ycbcr.tif", save(Image.new("YCbCr", (S, S), (100, 128, 200))), _solid((201, 49, 100)), ["ycbcr"], 1),
        ("lab.tif", save(Image.new("LAB", (S, S), (128, 128, 128))), _solid((_lab_gray(128),) * 3), ["lab"], 2),
        (
            "gray16.png",
            save(Image.fromarray(np.full((S, S), 40000, np.uint16))),
            _solid((156,) * 3),
            ["high_bit_depth_16"],
            0,
        ),
        (
            "gray16_little_endian.tif",
            save(Image.fromarray(np.full((S, S), 60000, np.uint16))),
            _solid((233,) * 3),
            ["high_bit_depth_16"],
            0,
        ),
        ("gray16_big_endian.tif", save(big_endian), _solid((78,) * 3), ["high_bit_depth_16"], 0),
        (
            "rgb16.png",
            lambda p: _png_rgb16(p, np.broadcast_to(np.array([65535, 32896, 0]), (S, S, 3))),
            _solid((255, 128, 0)),
            ["high_bit_depth_16"],
            0,
        ),
        (
            "int32_8bit_range.tif",
            save(Image.fromarray(np.full((S, S), 200, np.int32))),
            _solid((200,) * 3),
            ["integer_32"],
            0,
        ),
        (
            "int32_16bit_range.tif",
            save(Image.fromarray(np.full((S, S), 3000, np.int32))),
            _solid((12,) * 3),
            ["integer_32"],
            0,
        ),
        ("int32_signed.tif", save(Image.fromarray(i32_stretched)), i32_expected, ["integer_32"], 0),
        (
            "float32_unit.tif",
            save(Image.fromarray(np.full((S, S), 0.25, np.float32))),
            _solid((64,) * 3),
            ["float_32"],
            0,
        ),
        ("float32_wide.tif", save(Image.fromarray(f32_stretched)), f32_expected, ["float_32"], 1),
        (
            "profile.png",
            save(Image.new("RGB", (S, S), (255, 0, 0)), icc_profile=_icc_swapping_red_and_blue()),
            _solid((0, 0, 255)),
            ["icc_profile_to_srgb"],
            1,
        ),
        ("orientation.png", save(Image.fromarray(upright), exif=exif), rotated, ["exif_orientation"], 0),
        ("animated.gif", animated((250, 10, 10)), _solid((250, 10, 10)), ["animated_first_frame"], 0),
        ("animated.png", animated((240, 10, 10)), _solid((240, 10, 10)), ["animated_first_frame"], 0),
        ("animated.webp", animated((230, 10, 10), lossless=True), _solid((230, 10, 10)), ["animated_first_frame"], 0),
        ("pages.tif", animated((220, 10, 10)), _solid((220, 10, 10)), ["animated_first_frame"], 0),
    ]


CASES = _cases()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder: class `cases` holds one file of every case, class `plain` as many plain RGB
    PNGs; prepared through the real stage with every file used (train + val + test = all)."""
    root = tmp_path_factory.mktemp("images")
    (root / "images" / "cases").mkdir(parents=True)
    (root / "images" / "plain").mkdir()
    for name, write, *_ in CASES:
        write(root / "images" / "cases" / name)
    for i in range(len(CASES)):
        Image.new("RGB", (S, S), (i, 0, 0)).save(root / "images" / "plain" / f"{i}.png")
    params = yaml_params(
        root,
        {
            "source": "directory",
            "directory": str(root / "images"),
            "image_size": S,
            "train_per_class": len(CASES) - 2,
            "val_per_class": 1,
            "test_per_class": 1,
        },
    )
    result = run_stage("prepare", *cli(params=params, out=root / "prepared"), timeout=300)
    assert result.returncode == 0, result.stderr
    classes = json.loads((root / "prepared" / "classes.json").read_text())
    found = []
    for split in ("train", "val", "test"):
        with np.load(root / "prepared" / f"{split}.npz") as arrays:
            found += [
                image
                for image, label in zip(arrays["images"], arrays["labels"], strict=True)
                if classes[label] == "cases"
            ]
    return found, json.loads((root / "prepared" / "summary.json").read_text())


def yaml_params(root, data: dict):
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _expected_at_size(expected: np.ndarray) -> np.ndarray:
    """The orientation case is 16 x 32 once upright: prepare resizes it to 32 x 32 (bilinear)."""
    if expected.shape == (S, S, 3):
        return expected
    return np.asarray(Image.fromarray(expected).resize((S, S), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prepared_pixels_are_what_a_viewer_shows(prepared, case):
    images, _ = prepared
    name, _, expected, _, tolerance = case
    expected = _expected_at_size(expected).astype(int)
    distances = [int(np.abs(image.astype(int) - expected).max()) for image in images]
    assert min(distances) <= tolerance, f"{name}: closest prepared image differs by {min(distances)}"


def test_summary_counts_every_kind_of_conversion(prepared):
    _, summary = prepared
    expected = dict.fromkeys(KINDS, 0)
    for _, _, _, kinds, _ in CASES:
        for kind in kinds:
            expected[kind] += 1
    assert summary["conversions"] == expected
    assert all(count > 0 for count in expected.values())  # every kind has a case


def test_decode_reports_the_kinds_of_each_file(tmp_path):
    for name, write, _, kinds, _ in CASES:
        write(tmp_path / name)
        image, found = decode(tmp_path / name)
        assert image.mode == "RGB" and sorted(found) == sorted(kinds), name


def test_an_srgb_profile_is_left_alone(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (17, 34, 51)).save(tmp_path / "srgb.png", icc_profile=srgb)
    image, kinds = decode(tmp_path / "srgb.png")
    assert kinds == [] and image.getpixel((0, 0)) == (17, 34, 51)


def test_truncated_and_undecodable_files_are_unreadable(tmp_path):
    from pipeline.core.folders import decode_file

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "text.tif").write_text("not an image")
    for name in ("truncated.png", "text.tif"):
        decoded = decode_file(tmp_path / name, 32)
        assert decoded.pixels is None and len(decoded.file_sha256) == 64
