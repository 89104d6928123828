"""MSRResNet: SRResNet without batch norm, as in BasicSR / ClassSR.

Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a GAN", CVPR 2017 (SRResNet);
Wang et al., BasicSR's ``MSRResNet`` (modified SRResNet, no BN).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from effsr.archs.common import ResidualBlock, check_positive, check_scale, conv3x3


class MSRResNet(nn.Module):
    """``conv_first`` → LeakyReLU(0.1) → ``body`` (residual blocks ``conv1``/``conv2``) → ``upconv1``
    (+ ``upconv2`` at ×4) with PixelShuffle and LeakyReLU → ``conv_hr`` → LeakyReLU → ``conv_last``,
    plus bilinear upsampling of the input (global skip).

    Module names follow BasicSR, so its ``MSRResNet`` state dicts load directly. Published size:
    ×4, F=64, 16 blocks has 1,517,571 params ("1.5 M"); ClassSR's SRResNet branches use F = 36/52/64.
    No mean shift; ``pixel_range`` only records the range the weights expect (the network is linear in the
    skip path, so it behaves the same on [0, 1] and [0, 255] up to the learned biases).
    """

    def __init__(self, scale: int, num_features: int = 64, num_blocks: int = 16, pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, num_blocks=num_blocks, pixel_range=pixel_range)
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.conv_first = conv3x3(3, num_features)
        self.body = nn.Sequential(*(ResidualBlock(num_features) for _ in range(num_blocks)))
        shuffle = 2 if self.scale == 4 else self.scale
        self.upconv1 = conv3x3(num_features, num_features * shuffle * shuffle)
        self.upconv2 = conv3x3(num_features, num_features * 4) if self.scale == 4 else None
        self.pixel_shuffle = nn.PixelShuffle(shuffle)
        self.conv_hr = conv3x3(num_features, num_features)
        self.conv_last = conv3x3(num_features, 3)
        self.lrelu = nn.LeakyReLU(0.1)
        self._init_weights()

    def _init_weights(self) -> None:
        """BasicSR's initialisation: Kaiming-normal weights scaled by 0.1, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                module.weight.data.mul_(0.1)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.upconv2 is not None:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
