"""Per-patch MSE targets and the light CNN that estimates them (adaptive N:M patch inference)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MSEEstimator", "patch_mse", "rank_correlation"]


def patch_mse(sr: Tensor, hr: Tensor, pixel_range: float = 1.0, y_channel: bool = True) -> Tensor:
    """(P,) MSE per patch in [0, 1] units: of the BT.601 luma Y/255 (what PSNR-Y measures) or of RGB."""
    difference = (sr - hr) / pixel_range
    if y_channel:
        weights = torch.tensor([65.481, 128.553, 24.966], device=sr.device, dtype=sr.dtype) / 255.0
        difference = (difference * weights.view(1, 3, 1, 1)).sum(dim=1)
    return difference.pow(2).flatten(1).mean(dim=1)



def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (how well estimates order patches)."""
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    ranks = [rank - rank.mean() for rank in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()).clamp_min(1e-12))



class MSEEstimator(nn.Module):
    """Light CNN mapping an LR patch (input in [0, pixel_range]) to one log-MSE number.

    The patch is made zero-mean per channel (MSE does not depend on brightness, it does on contrast) and scaled
    to unit range; strided conv + LeakyReLU layers; pooling keeps the mean and the log mean energy of every
    feature map, plus the log mean squared gradient of the patch (SR error grows with high-frequency energy; this
    hand-made feature alone ranks held-out patches well); a two-layer head; ``shift`` (a buffer set from the
    first training targets) centres the output so training starts near the right magnitude.
    """

    def __init__(self, pixel_range: float = 1.0, num_features: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.pixel_range = pixel_range
        layers: list[nn.Module] = []
        channels = 3
        for index in range(num_layers):
            kernel = 4 if index == 0 else 3
            layers += [nn.Conv2d(channels, num_features, kernel, stride=2, padding=1), nn.LeakyReLU(0.1)]
            channels = num_features
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * num_features + 1, num_features), nn.LeakyReLU(0.1),
                                  nn.Linear(num_features, 1))
        self.register_buffer("shift", torch.zeros(()))

    def forward(self, lr: Tensor) -> Tensor:
        """(P, 3, h, w) → (P,) prediction (log MSE, or log MSE ratio; see :class:`NMEnsemble`)."""
        x = (lr - lr.mean(dim=(2, 3), keepdim=True)) * (4.0 / self.pixel_range)
        features = self.features(x)
        gray = x.mean(dim=1)
        gradient = gray.diff(dim=1).pow(2).mean(dim=(1, 2)) + gray.diff(dim=2).pow(2).mean(dim=(1, 2))
        pooled = torch.cat([features.mean(dim=(2, 3)), features.pow(2).mean(dim=(2, 3)).add(1e-4).log(),
                            gradient.add(1e-6).log()[:, None]], dim=1)
        return self.head(pooled).squeeze(-1) + self.shift

