"""Corrupted copies of the test set for the robustness check (ImageNet-C style, one severity).

Every function takes RGB images in 0..255 (N, H, W, 3), returns a new float32 array in the same
range, and is deterministic: the noise is drawn from `seed`, so every strategy is evaluated on
the very same corrupted images.
"""

from __future__ import annotations

import numpy as np

# severity 1..5 -> parameter (ImageNet-C's levels for noise and contrast; blur in pixels per
# 32 pixels of image side, so the same severity blurs a 224 image as much, relatively)
NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of Gaussian noise on the 0..1 scale
BLUR_SIGMA_PER_32PX = (0.5, 0.75, 1.0, 1.5, 2.0)
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)  # pixels pulled towards the image mean


def gaussian_noise(images: np.ndarray, severity: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, NOISE_SIGMA[severity - 1] * 255.0, size=images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).astype(np.float32)


def _kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """Separable Gaussian blur, edges reflected."""
    sigma = BLUR_SIGMA_PER_32PX[severity - 1] * images.shape[1] / 32
    kernel = _kernel(sigma)
    radius = len(kernel) // 2
    out = images.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(
            weight * np.take(padded, np.arange(offset, offset + size), axis=axis)
            for offset, weight in enumerate(kernel)
        )
    return np.clip(out, 0, 255).astype(np.float32)


def contrast(images: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    factor = CONTRAST_FACTOR[severity - 1]
    values = images.astype(np.float64)
    means = values.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip((values - means) * factor + means, 0, 255).astype(np.float32)


CORRUPT = {"gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast}


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """`images` with corruption `kind` (gaussian_noise | blur | contrast) at `severity` (1..5)."""
    if kind not in CORRUPT:
        raise ValueError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPT)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity} is not in 1..5")
    return CORRUPT[kind](images, severity, seed)
