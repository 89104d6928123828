"""PSNR/SSIM against straightforward implementations (per-pixel PSNR, the 2-D conv SSIM formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from effsr.errors import ConfigError
from effsr.metrics import PSNR, psnr, rgb_to_y, ssim
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


@pytest.mark.unit
def test_psnr_matches_naive_and_is_mean_of_per_image() -> None:
    sr, hr = _photo_pair()
    value = psnr(sr, hr, crop_border=2).item()
    assert abs(value - _naive_psnr_y(sr[0].numpy(), hr[0].numpy(), 2)) < 1e-9
    noisy = (hr + 0.05 * torch.randn_like(hr, generator=None)).clamp(0, 1)
    metric = PSNR(crop_border=2)
    metric.update(torch.cat([sr, noisy]), torch.cat([hr, hr]))
    per_image = psnr(torch.cat([sr, noisy]), torch.cat([hr, hr]), crop_border=2)
    assert torch.isclose(metric.compute(), per_image.mean())


@pytest.mark.unit
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


def _conv2d_ssim(sr: torch.Tensor, hr: torch.Tensor, crop: int, y_channel: bool) -> torch.Tensor:
    """The 2-D formula SSIM was first written with: uint8 rounding, BT.601 Y, crop, five float64 11x11 conv2d's
    over the valid region, mean over the map and channels."""

    def pixels(image: torch.Tensor) -> torch.Tensor:
        rounded = torch.round(image.double().clamp(0, 1) * 255.0).expand(-1, 3, -1, -1)
        if y_channel:
            rounded = 16.0 + (65.481 * rounded[:, 0:1] + 128.553 * rounded[:, 1:2] + 24.966 * rounded[:, 2:3]) / 255.0
        rounded = rounded[..., crop:-crop, crop:-crop] if crop else rounded
        return rounded.reshape(-1, 1, *rounded.shape[-2:])

    first, second = pixels(sr), pixels(hr)
    gauss = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / 4.5)
    window = torch.outer(gauss, gauss)[None, None] / gauss.sum() ** 2
    mu1, mu2 = F.conv2d(first, window), F.conv2d(second, window)
    sigma1 = F.conv2d(first * first, window) - mu1**2
    sigma2 = F.conv2d(second * second, window) - mu2**2
    sigma12 = F.conv2d(first * second, window) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    return ssim_map.mean(dim=(1, 2, 3)).reshape(len(sr), -1).mean(dim=1)


def _image_pair(kind: str, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sr, hr) float32 in [0,1]: a photograph and its noisy copy, uniform noise (independent or correlated),
    flat images (zero variance) or a checkerboard against a gradient."""
    generator = torch.Generator().manual_seed(sum(shape))
    batch, channels, height, width = shape
    if kind == "photo":
        photo = torch.from_numpy(data.chelsea()[:height, 40:40 + width]).permute(2, 0, 1)[None] / 255
        hr = photo[:, :channels].expand(batch, -1, -1, -1).contiguous()
        return (hr + 0.03 * torch.randn(shape, generator=generator)).clamp(0, 1), hr
    if kind == "random":
        hr = torch.rand(shape, generator=generator)
        return (hr + 0.2 * torch.rand(shape, generator=generator)).clamp(0, 1), hr
    if kind == "independent":
        return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    if kind == "flat":
        return torch.full(shape, 0.25), torch.full(shape, 0.7)
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = ((rows // 3 + columns // 2) % 2).float().expand(shape)
    gradient = (rows + 2 * columns).float().expand(shape) / (height + 2 * width)
    return checker, gradient


CASES = [  # kind, (N,C,H,W), crop, y_channel: the minimal 11x11 valid size, odd sizes, batches, gray input
    ("photo", (1, 3, 15, 15), 2, True),
    ("random", (1, 3, 11, 11), 0, False),
    ("photo", (2, 3, 37, 53), 3, True),
    ("random", (3, 3, 29, 19), 4, False),
    ("independent", (2, 3, 21, 40), 2, True),
    ("flat", (2, 3, 16, 19), 2, False),
    ("checker", (2, 1, 33, 27), 0, True),
    ("checker", (1, 3, 45, 12), 0, False),
    ("photo", (1, 3, 130, 161), 2, False),
]


@pytest.mark.unit
@pytest.mark.parametrize(("kind", "shape", "crop", "y_channel"), CASES)
def test_ssim_equals_the_2d_conv_formula(kind: str, shape: tuple[int, int, int, int], crop: int,
                                         y_channel: bool) -> None:
    sr, hr = _image_pair(kind, shape)
    expected = _conv2d_ssim(sr, hr, crop, y_channel)
    value = ssim(sr, hr, crop_border=crop, y_channel=y_channel)
    assert value.dtype == torch.float64 and value.shape == (shape[0],)
    assert torch.all((value - expected).abs() <= 1e-12 * expected.abs()), (value, expected)


@pytest.mark.unit
@pytest.mark.parametrize("chunk_elements", [1, 5 * 3 * 2 * 40])
def test_ssim_row_chunks_give_the_same_values(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    """Forced chunks of 1 and 2 output rows (the last one shorter) give the one-pass numbers."""
    sr, hr = _image_pair("photo", (3, 3, 27, 40))
    expected = _conv2d_ssim(sr, hr, 0, False)
    monkeypatch.setattr("effsr.metrics.functional._CPU_CHUNK_ELEMENTS", chunk_elements)
    value = ssim(sr, hr, crop_border=0, y_channel=False)
    assert torch.all((value - expected).abs() <= 1e-12 * expected.abs())


@pytest.mark.unit
def test_ssim_needs_an_11x11_valid_region() -> None:
    sr, hr = _image_pair("random", (1, 3, 14, 30))
    with pytest.raises(ConfigError, match="crop_border=2"):
        ssim(sr, hr, crop_border=2)


@pytest.mark.unit
def test_rgb_to_y_rounds_like_the_bt601_formula() -> None:
    """The in-place evaluation gives bit-identical Y to the written-out formula."""
    pixels = torch.round(torch.rand(2, 3, 17, 9, dtype=torch.float64) * 255)
    red, green, blue = pixels[:, 0:1], pixels[:, 1:2], pixels[:, 2:3]
    assert torch.equal(rgb_to_y(pixels), 16.0 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ssim_on_cuda_equals_the_cpu_formula() -> None:
    sr, hr = _image_pair("photo", (2, 3, 130, 161))
    expected = _conv2d_ssim(sr, hr, 4, True)
    value = ssim(sr.cuda(), hr.cuda(), crop_border=4)
    assert value.device.type == "cuda"
    assert torch.all((value.cpu() - expected).abs() <= 1e-12 * expected.abs())
