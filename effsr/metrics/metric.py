"""torchmetrics wrappers: mean of per-image PSNR/SSIM with sum/count states that reduce under DDP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import Metric

from effsr.metrics.functional import psnr, ssim


class _PerImageMean(Metric):
    """Keeps the float64 sum of per-image scores and the image count; compute() = their mean."""

    full_state_update = False
    higher_is_better = True
    score_fn: Callable[..., torch.Tensor]

    def __init__(self, crop_border: int, y_channel: bool = True) -> None:
        super().__init__()
        self.crop_border = crop_border
        self.y_channel = y_channel
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, sr: torch.Tensor, hr: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Adds the per-image scores of a batch. ``scores``: those values already computed from ``sr``/``hr`` with
        this metric's function, crop and channel (a caller that also keeps the per-image values scores once)."""
        if scores is None:
            scores = type(self).score_fn(sr, hr, self.crop_border, self.y_channel)
        self.total += scores.sum().to(self.total.device)
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        """Mean of per-image values (not the pooled MSE)."""
        return self.total / self.count


class PSNR(_PerImageMean):
    """Mean per-image PSNR (dB) per docs/protocol.md."""

    score_fn = staticmethod(psnr)


class SSIM(_PerImageMean):
    """Mean per-image SSIM per docs/protocol.md."""

    score_fn = staticmethod(ssim)
