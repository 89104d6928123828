"""CARN and CARN-M (single-scale).

Ahn et al., "Fast, Accurate, and Lightweight Super-Resolution with Cascading Residual Network", ECCV 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from effsr.archs.common import MeanShift, Upsampler, check_positive, check_scale, conv3x3


class CARNResidualBlock(nn.Module):
    """CARN residual block: ``relu(x + conv2(relu(conv1(x))))``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(num_features, num_features)
        self.conv2 = conv3x3(num_features, num_features)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class EfficientResidualBlock(nn.Module):
    """CARN-M's efficient residual block: grouped conv3x3 → ReLU → grouped conv3x3 → ReLU → conv1x1, + x, ReLU."""

    def __init__(self, num_features: int, group: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(num_features, num_features, groups=group)
        self.conv2 = conv3x3(num_features, num_features, groups=group)
        self.pointwise = nn.Conv2d(num_features, num_features, 1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.relu(x + self.pointwise(out))


class CascadingBlock(nn.Module):
    """Local cascade: three residual units, each output concatenated with all earlier ones and fused by
    a 1×1 conv + ReLU (``fuse[k]``: (k+2)·F → F).

    With ``shared_unit=True`` (CARN-M) the three residual units are one module applied recursively.
    """

    def __init__(self, num_features: int, shared_unit: bool = False, group: int = 1) -> None:
        super().__init__()
        if shared_unit:
            self.units = nn.ModuleList([EfficientResidualBlock(num_features, group)])
        else:
            self.units = nn.ModuleList([CARNResidualBlock(num_features) for _ in range(3)])
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d((index + 2) * num_features, num_features, 1), nn.ReLU()) for index in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        cascade = x
        out = x
        for index, fuse in enumerate(self.fuse):
            unit = self.units[index % len(self.units)]
            cascade = torch.cat([cascade, unit(out)], dim=1)
            out = fuse(cascade)
        return out


class _CascadingNetwork(nn.Module):
    """Shared CARN/CARN-M skeleton: mean shift → entry conv → 3 cascading blocks with global cascading
    1×1 fusions → upsampler (conv + ReLU + PixelShuffle) → exit conv → add mean."""

    def __init__(self, scale: int, num_features: int, pixel_range: float, shared_unit: bool, group: int) -> None:
        super().__init__()
        check_positive(num_features=num_features, group=group, pixel_range=pixel_range)
        if num_features % group:
            raise ValueError(f"group={group} must divide num_features={num_features}")
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.sub_mean = MeanShift(pixel_range, sign=-1)
        self.entry = conv3x3(3, num_features)
        self.blocks = nn.ModuleList(
            CascadingBlock(num_features, shared_unit=shared_unit, group=group) for _ in range(3)
        )
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d((index + 2) * num_features, num_features, 1), nn.ReLU()) for index in range(3)
        )
        self.upsampler = Upsampler(self.scale, num_features, activation="relu", groups=group)
        self.exit = conv3x3(num_features, 3)
        self.add_mean = MeanShift(pixel_range, sign=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.entry(self.sub_mean(x))
        cascade = out
        for block, fuse in zip(self.blocks, self.fuse, strict=True):
            cascade = torch.cat([cascade, block(out)], dim=1)
            out = fuse(cascade)
        return self.add_mean(self.exit(self.upsampler(out)))


class CARN(_CascadingNetwork):
    """CARN, single-scale: 3 cascading blocks of 3 plain residual blocks.

    Published size: the official single-scale CARN ×4 has 1,111,875 params (1.11 M); the paper's 1.59 M
    is the multi-scale model with ×2/×3/×4 upsamplers. Module names: ``entry``, ``blocks[b].units[u].conv1/conv2``,
    ``blocks[b].fuse[k]``, ``fuse[k]``, ``upsampler``, ``exit``.
    """

    def __init__(self, scale: int, num_features: int = 64, pixel_range: float = 1.0) -> None:
        super().__init__(scale, num_features, pixel_range, shared_unit=False, group=1)


class CARNM(_CascadingNetwork):
    """CARN-M, single-scale: efficient residual blocks (grouped convs) shared recursively inside each
    cascading block, grouped upsampler convs.

    ``group`` must divide ``num_features``; ClassSR's widths 36/52/64 all work with the default group=4.
    Published size: 412 K params for the multi-scale model; the single-scale ×4 model has 294,147.
    (ClassSR's own CARN-M variant adds BatchNorm; not reproduced here.)
    """

    def __init__(self, scale: int, num_features: int = 64, group: int = 4, pixel_range: float = 1.0) -> None:
        super().__init__(scale, num_features, pixel_range, shared_unit=True, group=group)
