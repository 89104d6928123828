"""PSNR/SSIM against a straightforward per-pixel implementation on real photographs."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage import data

from effsr.metrics import PSNR, psnr, ssim
from effsr.ops import imresize


def _photo_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """HR photograph and its bicubic ×2 round trip, float in [0,1], (1,3,H,W)."""
    hr = torch.from_numpy(data.chelsea()[:128, :160]).permute(2, 0, 1)[None].double() / 255
    return imresize(imresize(hr, 0.5), 2.0).clamp(0, 1), hr


def _naive_psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int) -> float:
    """Plain numpy Y-PSNR: round to uint8, BT.601 Y, crop, 10 log10(255^2/MSE)."""

    def luma(image: np.ndarray) -> np.ndarray:
        pixels = np.round(np.clip(image, 0, 1) * 255) / 255
        return 16 + 65.481 * pixels[0] + 128.553 * pixels[1] + 24.966 * pixels[2]

    diff = (luma(sr) - luma(hr))[crop:-crop, crop:-crop]
    return 10 * math.log10(255**2 / float(np.mean(diff**2)))


def test_psnr_matches_naive_and_is_mean_of_per_image() -> None:
    sr, hr = _photo_pair()
    value = psnr(sr, hr, crop_border=2).item()
    assert abs(value - _naive_psnr_y(sr[0].numpy(), hr[0].numpy(), 2)) < 1e-9
    noisy = (hr + 0.05 * torch.randn_like(hr, generator=None)).clamp(0, 1)
    metric = PSNR(crop_border=2)
    metric.update(torch.cat([sr, noisy]), torch.cat([hr, hr]))
    per_image = psnr(torch.cat([sr, noisy]), torch.cat([hr, hr]), crop_border=2)
    assert torch.isclose(metric.compute(), per_image.mean())


def test_ddp_style_state_sum_and_ssim_range() -> None:
    sr, hr = _photo_pair()
    whole, first, second = PSNR(2), PSNR(2), PSNR(2)
    batch_sr, batch_hr = torch.cat([sr, hr]), torch.cat([hr, hr * 0.9])
    whole.update(batch_sr, batch_hr)
    first.update(batch_sr[:1], batch_hr[:1])
    second.update(batch_sr[1:], batch_hr[1:])
    assert torch.isclose((first.total + second.total) / (first.count + second.count), whole.compute())
    value = ssim(sr, hr, crop_border=2).item()
    assert 0.5 < value < 1.0
    assert ssim(hr, hr, crop_border=2).item() == 1.0
