"""Paper-exact PSNR / SSIM (docs/protocol.md): uint8 rounding, BT.601 Y in float64, crop, per-image values.

SSIM filters with the 11x11 Gaussian as two 1-D passes (the window is the outer product of a 1-D Gaussian),
all five local moments of a batch at once, in row chunks, so the moment maps never exist at full size. The
numbers equal those of the five float64 11x11 conv2d's it replaces to ~1e-15 relative (tests/test_metrics.py).
"""

from __future__ import annotations

import torch

from effsr.errors import ConfigError

SSIM_WINDOW = 11  # side of SSIM's Gaussian window (sigma 1.5); only the valid region is scored
_SSIM_RADIUS = SSIM_WINDOW // 2  # the valid region drops this many pixels on each side
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
# 32 MiB of float64 moments per CPU row chunk (~400 rows of a 2K image). 2^18 costs 20 % less CPU time but runs
# 16x more OpenMP regions, whose barriers dominate the wall time when other processes share the cores (2K Y pair,
# load 12 on 2 cores: 3.9 s wall at 2^22, 12.2 s at 2^18).
_CPU_CHUNK_ELEMENTS = 1 << 22
_DEVICE_CHUNK_ELEMENTS = 1 << 27  # 1 GiB per chunk on accelerators: one pass for any single image, bounded memory


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (N,3,H,W) RGB in [0,255] -> (N,1,H,W) Y in [16,235] (not rounded).

    Evaluated as 16 + ((65.481 R + 128.553 G) + 24.966 B) / 255, in place on one buffer.
    """
    luma = img[:, 0:1] * 65.481
    luma += img[:, 1:2] * 128.553
    luma += img[:, 2:3] * 24.966
    luma /= 255.0
    luma += 16.0
    return luma


def _prepare(image: torch.Tensor, crop_border: int, y_channel: bool) -> torch.Tensor:
    """Crop, then clamp to [0,1], x255, round in float64, grayscale -> RGB, Y (optional).

    All steps are per pixel, so cropping first gives the same values with less work.
    """
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ConfigError(f"metrics expect (N,3,H,W) or (N,1,H,W) tensors, got shape {tuple(image.shape)}")
    if crop_border > 0:
        image = image[..., crop_border:-crop_border, crop_border:-crop_border]
    pixels = image.detach().to(torch.float64, copy=True).clamp_(0, 1).mul_(255.0).round_()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if y_channel:
        pixels = rgb_to_y(pixels)
    return pixels


def _check_shapes(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape[0] != hr.shape[0] or sr.shape[-2:] != hr.shape[-2:]:
        raise ConfigError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")


def psnr(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool = True) -> torch.Tensor:
    """Per-image PSNR (N,) float64; identical images give +inf."""
    _check_shapes(sr, hr)
    mse = (_prepare(sr, crop_border, y_channel) - _prepare(hr, crop_border, y_channel)).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_taps() -> list[float]:
    """The 11 normalised 1-D Gaussian weights (sigma 1.5) in float64; exactly symmetric (w[k] == w[10-k])."""
    coords = torch.arange(2 * _SSIM_RADIUS + 1, dtype=torch.float64) - _SSIM_RADIUS
    gauss = torch.exp(-(coords**2) / (2 * 1.5**2))
    return (gauss / gauss.sum()).tolist()


def _filter_valid(moments: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """Valid 11-tap correlation along `dim` with symmetric taps: w5 x5 + sum_k w_k (x_k + x_{10-k})."""
    length = moments.shape[dim] - 2 * _SSIM_RADIUS
    shifted = [moments.narrow(dim, offset, length) for offset in range(2 * _SSIM_RADIUS + 1)]
    result = shifted[_SSIM_RADIUS] * taps[_SSIM_RADIUS]
    pair = torch.empty_like(result)
    for offset in range(_SSIM_RADIUS):
        torch.add(shifted[offset], shifted[2 * _SSIM_RADIUS - offset], out=pair)
        result.add_(pair, alpha=taps[offset])
    return result


def _ssim_map_sums(first: torch.Tensor, second: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Sum of the valid SSIM map of each (H,W) plane of two (P,H,W) stacks: one batched filter of 5 moments."""
    moments = torch.empty((first.shape[0], 5, *first.shape[1:]), dtype=first.dtype, device=first.device)
    moments[:, 0], moments[:, 1] = first, second
    torch.mul(first, first, out=moments[:, 2])
    torch.mul(second, second, out=moments[:, 3])
    torch.mul(first, second, out=moments[:, 4])
    local = _filter_valid(_filter_valid(moments, taps, dim=-2), taps, dim=-1)
    mu1, mu2, mean11, mean22, mean12 = local.unbind(1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1, sigma2, sigma12 = mean11 - mu1_sq, mean22 - mu2_sq, mean12 - mu1_mu2
    numerator = (2 * mu1_mu2 + _SSIM_C1) * (2 * sigma12 + _SSIM_C2)
    denominator = (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1 + sigma2 + _SSIM_C2)
    return (numerator / denominator).sum(dim=(-2, -1))


def ssim(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool = True) -> torch.Tensor:
    """Per-image SSIM (N,) float64: 11x11 Gaussian (sigma 1.5), valid region, mean over map and channels.

    Runs on the images' device, in chunks of output rows (each reading 10 extra input rows): a few per 2K
    image on the CPU, a 2K image in one pass elsewhere (memory still bounded for big batches).
    """
    _check_shapes(sr, hr)
    first = _prepare(sr, crop_border, y_channel)
    second = _prepare(hr, crop_border, y_channel)
    batch, channels, height, width = first.shape
    out_height, out_width = height - 2 * _SSIM_RADIUS, width - 2 * _SSIM_RADIUS
    if out_height < 1 or out_width < 1:
        minimum = 2 * (_SSIM_RADIUS + crop_border) + 1
        raise ConfigError(
            f"SSIM needs images of at least {minimum}x{minimum} pixels (11x11 left after cropping "
            f"crop_border={crop_border} per side), got {height}x{width} after the crop: evaluate on larger images"
        )
    planes = batch * channels
    first, second = first.reshape(planes, height, width), second.reshape(planes, height, width)
    budget = _CPU_CHUNK_ELEMENTS if first.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    rows = max(1, min(out_height, budget // (5 * planes * width)))
    taps = _gaussian_taps()
    sums = torch.zeros(planes, dtype=torch.float64, device=first.device)
    for start in range(0, out_height, rows):
        stop = min(start + rows, out_height) + 2 * _SSIM_RADIUS
        sums += _ssim_map_sums(first[:, start:stop], second[:, start:stop], taps)
    return (sums / (out_height * out_width)).reshape(batch, channels).mean(dim=1)
