"""Paper-exact PSNR/SSIM metrics (functional and torchmetrics)."""

from effsr.metrics.functional import SSIM_WINDOW, psnr, rgb_to_y, ssim
from effsr.metrics.metric import PSNR, SSIM

__all__ = ["PSNR", "SSIM", "SSIM_WINDOW", "psnr", "rgb_to_y", "ssim"]
