"""Verbatim copy of effsr's SSIM before the separable rewrite (five 11x11 float64 conv2d's, valid region); the
reference that benchmarks/metrics_speed.py times and compares against. Only the function names are prefixed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effsr.errors import ConfigError


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (N,3,H,W) RGB in [0,255] -> (N,1,H,W) Y in [16,235] (not rounded)."""
    red, green, blue = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 16.0 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255.0


def _prepare(image: torch.Tensor, crop_border: int, y_channel: bool) -> torch.Tensor:
    """Clamp to [0,1], x255, round, grayscale -> RGB, Y (optional) in float64, crop."""
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ConfigError(f"metrics expect (N,3,H,W) or (N,1,H,W) tensors, got shape {tuple(image.shape)}")
    pixels = torch.round(image.detach().to(torch.float64).clamp(0, 1) * 255.0)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if y_channel:
        pixels = rgb_to_y(pixels)
    if crop_border > 0:
        pixels = pixels[..., crop_border:-crop_border, crop_border:-crop_border]
    return pixels


def _check_shapes(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape[0] != hr.shape[0] or sr.shape[-2:] != hr.shape[-2:]:
        raise ConfigError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")


def _gaussian_window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(11, dtype=torch.float64, device=device) - 5
    gauss = torch.exp(-(coords**2) / (2 * 1.5**2))
    gauss = gauss / gauss.sum()
    return (gauss[:, None] * gauss[None, :])[None, None]


def reference_ssim(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool = True) -> torch.Tensor:
    """Per-image SSIM (N,) float64: 11x11 Gaussian (sigma 1.5), valid region, mean over map and channels."""
    _check_shapes(sr, hr)
    first = _prepare(sr, crop_border, y_channel)
    second = _prepare(hr, crop_border, y_channel)
    batch, channels, height, width = first.shape
    first = first.reshape(batch * channels, 1, height, width)
    second = second.reshape(batch * channels, 1, height, width)
    window = _gaussian_window(first.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = F.conv2d(first, window), F.conv2d(second, window)
    sigma1 = F.conv2d(first * first, window) - mu1**2
    sigma2 = F.conv2d(second * second, window) - mu2**2
    sigma12 = F.conv2d(first * second, window) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    return ssim_map.mean(dim=(1, 2, 3)).reshape(batch, channels).mean(dim=1)
