"""Decode an image file to the 8-bit sRGB pixels an image viewer shows, and say what it took.

PIL's `convert("RGB")` is right for 8-bit RGB, grayscale and palette images only: it clips 16-bit
and 32-bit values (a 16-bit scan becomes a white square), drops transparency (showing the colour
stored under transparent pixels), ignores EXIF orientation and embedded colour profiles, and has
no conversion for CIELAB. `decode` handles each of these the way a viewer does; where viewers
differ it makes one documented choice (README "Data"):

  kind (summary.json `conversions`)   what a viewer shows             what `decode` does
  high_bit_depth_16                   16-bit gray (I;16, any byte      round(v / 257): the full 0..65535
                                      order), 16-bit RGB(A) PNG         range onto 0..255
  integer_32                          32-bit integer gray (I)          0..255 as is; else 0..65535 as
                                                                        16-bit; else stretched min..max
  float_32                            32-bit float gray (F)            0..1 scaled to 0..255; else
                                                                        stretched min..max (NaN -> 0)
  bilevel                             1-bit black / white              0 / 255
  alpha_composited_on_white           transparency (alpha channel,     composited over white, as a web
                                      palette or colour-key)           page shows it
  cmyk                                CMYK (print)                     embedded ICC profile if any, else
                                                                        PIL's naive inversion
  ycbcr / lab                         YCbCr TIFF, CIELAB TIFF          converted to sRGB (LAB: via lcms)
  icc_profile_to_srgb                 non-sRGB ICC profile (Adobe      converted to sRGB, perceptual
                                      RGB, Display P3, a camera's)
  exif_orientation                    EXIF orientation 2..8 (phones)   rotated / flipped upright
  animated_first_frame                GIF / PNG / WebP animation,      the first frame
                                      multi-page TIFF
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
WHITE = (255, 255, 255)
KINDS = {  # kind -> how the report's data caveat says it ("41 16-bit images rescaled to 8 bits")
    "high_bit_depth_16": "16-bit images rescaled to 8 bits",
    "integer_32": "32-bit integer images mapped to 8 bits",
    "float_32": "32-bit float images mapped to 8 bits",
    "bilevel": "1-bit images",
    "alpha_composited_on_white": "images with transparency composited on white",
    "cmyk": "CMYK images converted to RGB",
    "ycbcr": "YCbCr images converted to RGB",
    "lab": "CIELAB images converted to sRGB",
    "icc_profile_to_srgb": "images converted from their embedded colour profile to sRGB",
    "exif_orientation": "images rotated or flipped upright by their EXIF orientation",
    "animated_first_frame": "animated or multi-page files (first frame used)",
}
# what a corrupt, truncated or unsupported file raises on decode (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, ImageCms.PyCMSError)
_SRGB = ImageCms.createProfile("sRGB")


def decode(source: Path | BinaryIO, draft: int | None = None) -> tuple[Image.Image, list[str]]:
    """(8-bit RGB image as a viewer shows the file, the `KINDS` of conversion it needed).

    `draft`: the smallest side the caller needs. A JPEG is then decoded by DCT scaling (PIL's
    draft mode) to 1/8, 1/4 or 1/2 of its size, the smallest whose sides stay at least `draft`:
    several times faster on a camera-size photo. Only scales that divide both sides: a partial
    DCT block at the edge stretches the image by a fraction of a pixel, which moved the prepared
    pixels of a 4000x2650 photo by up to 20 levels at 224; exact scales moved them by 0.1-0.15 on
    average, at most 4 (README "Data")."""
    kinds: list[str] = []
    with Image.open(source) as image:
        scale = _draft_scale(image.size, draft) if draft and image.format in ("JPEG", "MPO") else 1
        if scale > 1:
            image.draft(image.mode, (image.width // scale, image.height // scale))
        if getattr(image, "n_frames", 1) > 1:
            kinds.append("animated_first_frame")
            image.seek(0)
        if _is_16_bit_colour_png(image):  # before load(): PIL drops the PNG chunk reader then
            kinds.append("high_bit_depth_16")
        image.load()
        orientation = image.getexif().get(0x0112, 1)
        if orientation in range(2, 9):
            kinds.append("exif_orientation")
            image = ImageOps.exif_transpose(image)
        icc = image.info.get("icc_profile")
        rgb = _to_rgb(image, kinds)
        if icc and image.mode != "CMYK" and not _is_srgb(icc):
            rgb = _profile_to_srgb(rgb, icc, kinds)
        return rgb, kinds


def _draft_scale(size: tuple[int, int], smallest: int) -> int:
    """The largest DCT scale-down (8, 4, 2; else 1) that divides both sides and keeps them at
    least `smallest` pixels."""
    width, height = size
    for scale in (8, 4, 2):
        if width % scale == 0 and height % scale == 0 and min(width, height) // scale >= smallest:
            return scale
    return 1


def _to_rgb(image: Image.Image, kinds: list[str]) -> Image.Image:
    mode = image.mode
    if mode in SIXTEEN_BIT or mode == "I":
        return Image.fromarray(_integer_to_8bit(np.asarray(image), mode, kinds)).convert("RGB")
    if mode == "F":
        kinds.append("float_32")
        return Image.fromarray(_float_to_8bit(np.asarray(image))).convert("RGB")
    if mode == "1":
        kinds.append("bilevel")
        return image.convert("L").convert("RGB")
    if mode == "CMYK":
        kinds.append("cmyk")
        icc = image.info.get("icc_profile")
        if icc:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
        return image.convert("RGB")
    if mode == "YCbCr":
        kinds.append("ycbcr")
        return image.convert("RGB")
    if mode == "LAB":
        kinds.append("lab")
        return ImageCms.profileToProfile(image, ImageCms.createProfile("LAB"), _SRGB, outputMode="RGB")
    if mode in ("LA", "PA", "RGBA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            kinds.append("alpha_composited_on_white")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
        return rgba.convert("RGB")
    return image.convert("RGB")


def _integer_to_8bit(values: np.ndarray, mode: str, kinds: list[str]) -> np.ndarray:
    values = values.astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if mode in SIXTEEN_BIT:
        kinds.append("high_bit_depth_16")
        return ((values + 128) // 257).astype(np.uint8)
    kinds.append("integer_32")
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return ((values + 128) // 257).astype(np.uint8)
    return _stretch(values.astype(np.float64), low, high)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    values = np.where(np.isfinite(values), values, 0.0).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255).astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255 / (high - low))).astype(np.uint8)


def _is_16_bit_colour_png(image: Image.Image) -> bool:
    """PIL reduces 16-bit RGB(A) PNGs to 8 bits on decode (the high byte, as viewers show them);
    counted so that a reader sees their bit depth was reduced."""
    png = getattr(image, "png", None) if image.format == "PNG" else None
    return png is not None and png.im_rawmode in ("RGB;16B", "RGBA;16B", "LA;16B")


def _is_srgb(icc: bytes) -> bool:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return "srgb" in ImageCms.getProfileDescription(profile).lower()
    except (OSError, ImageCms.PyCMSError):
        return True  # an unreadable profile: viewers fall back to sRGB as well


def _profile_to_srgb(rgb: Image.Image, icc: bytes, kinds: list[str]) -> Image.Image:
    """The image's pixels interpreted in its embedded profile, rendered to sRGB. Grayscale profiles
    apply to the single channel of the original; the RGB copy then carries neutral grays."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return rgb
        converted = ImageCms.profileToProfile(rgb, profile, _SRGB, outputMode="RGB")
    except (OSError, ImageCms.PyCMSError):
        return rgb
    kinds.append("icc_profile_to_srgb")
    return converted
