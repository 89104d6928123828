"""Plain numpy reference of MATLAB imresize (bicubic, antialiased), written per output pixel from the algorithm
(as BasicSR's Python port computes it); used to check and time effsr.ops.imresize."""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    absx = np.abs(x)
    return (1.5 * absx**3 - 2.5 * absx**2 + 1) * (absx <= 1) + (
        -0.5 * absx**3 + 2.5 * absx**2 - 4 * absx + 2
    ) * ((absx > 1) & (absx <= 2))


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: mirrored 0-based source indices and normalised weights (out_len, taps)."""
    width = 4.0 / scale if scale < 1 else 4.0
    taps = math.ceil(width) + 2
    source = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
    positions = np.floor(source - width / 2)[:, None] + np.arange(taps)[None, :]
    distance = source[:, None] - positions
    weights = scale * _cubic(distance * scale) if scale < 1 else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    zero_based = positions.astype(np.int64) - 1
    zero_based = np.where(zero_based < 0, -zero_based - 1, zero_based)
    zero_based = np.where(zero_based >= in_len, 2 * in_len - 1 - zero_based, zero_based)
    return zero_based, weights


def reference_imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """HW or HWC float64 image -> resized float64 image (height first, then width)."""
    in_h, in_w = image.shape[:2]
    out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    rows, row_weights = _contributions(in_h, out_h, scale)
    cols, col_weights = _contributions(in_w, out_w, scale)
    image = image.astype(np.float64)
    tall = np.einsum("ot,ot...->o...", row_weights, image[rows])
    return np.einsum("ot,aot...->ao...", col_weights, tall[:, cols])


def reference_imresize_uint8(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 in, float64 compute, round and clip to uint8."""
    return np.clip(np.round(reference_imresize(image, scale)), 0, 255).astype(np.uint8)
