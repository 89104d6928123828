"""MATLAB-compatible antialiased bicubic ``imresize`` in torch (conventions.md), plus mod-crop and the
bicubic degradation used to make LR images from HR ones."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from effsr.errors import ConfigError


def _cubic(distance: torch.Tensor) -> torch.Tensor:
    """Keys cubic kernel with a = -0.5 (MATLAB's ``cubic``)."""
    absx = distance.abs()
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return inner + outer


@lru_cache(maxsize=64)
def _resize_matrix(
    in_length: int, out_length: int, scale: float, antialias: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Dense (out_length, in_length) matrix of normalised bicubic weights with symmetric padding folded in.

    Built in float64 once per (size, scale, device, dtype) so applying the resize is one matmul per axis.
    """
    kernel_width = 4.0
    widen = antialias and scale < 1
    if widen:
        kernel_width /= scale
    positions = torch.arange(1, out_length + 1, dtype=torch.float64)
    source = positions / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(source - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    distance = source[:, None] - indices
    weights = scale * _cubic(distance * scale) if widen else _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    zero_based = indices.long() - 1
    mirrored = torch.where(zero_based < 0, -zero_based - 1, zero_based)
    mirrored = torch.where(mirrored >= in_length, 2 * in_length - 1 - mirrored, mirrored)
    mirrored = mirrored.clamp(0, in_length - 1)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, mirrored, weights)
    return matrix.to(device=device, dtype=dtype)


def imresize(
    image: torch.Tensor,
    scale: float | None = None,
    output_size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resizes a float image (H,W), (C,H,W) or (N,C,H,W) like MATLAB ``imresize(..., 'bicubic')``.

    Give ``scale`` (output size = ceil(in * scale)) or ``output_size`` (H, W). Device/dtype follow the input.
    """
    if image.ndim not in (2, 3, 4):
        raise ConfigError(f"imresize expects (H,W), (C,H,W) or (N,C,H,W); got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ConfigError("imresize expects a float tensor; convert uint8 with .float() (or use imresize_uint8)")
    in_h, in_w = image.shape[-2:]
    if output_size is not None:
        out_h, out_w = int(output_size[0]), int(output_size[1])
        scale_h, scale_w = out_h / in_h, out_w / in_w
    elif scale is not None:
        if scale <= 0:
            raise ConfigError(f"imresize scale must be > 0, got {scale}")
        scale_h = scale_w = float(scale)
        out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    else:
        raise ConfigError("imresize needs either scale or output_size")
    matrix_h = _resize_matrix(in_h, out_h, scale_h, antialias, image.device, image.dtype)
    matrix_w = _resize_matrix(in_w, out_w, scale_w, antialias, image.device, image.dtype)
    resized = torch.matmul(matrix_h, image)
    return torch.matmul(resized, matrix_w.T)


def imresize_uint8(image: np.ndarray, scale: float) -> np.ndarray:
    """Resizes an HW or HWC uint8 array in float64 and rounds back to uint8 (as BasicSR's port + PNG write)."""
    if image.dtype != np.uint8:
        raise ConfigError(f"imresize_uint8 expects a uint8 array, got {image.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float64)
    if image.ndim == 3:
        tensor = tensor.permute(2, 0, 1)
    resized = imresize(tensor, scale=scale)
    if image.ndim == 3:
        resized = resized.permute(1, 2, 0)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def mod_crop(image: np.ndarray, modulus: int) -> np.ndarray:
    """Crops the bottom/right so height and width are multiples of ``modulus``."""
    height, width = image.shape[:2]
    return image[: height - height % modulus, : width - width % modulus]


def bicubic_degrade(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Mod-crops HR to ``scale`` and makes its LR with the MATLAB bicubic; returns (hr_cropped, lr) uint8."""
    if scale < 1:
        raise ConfigError(f"scale must be a positive integer, got {scale}")
    hr_cropped = mod_crop(hr, scale)
    return hr_cropped, imresize_uint8(hr_cropped, 1 / scale)
