"""Building blocks shared by the backbones: mean shift, convolutions and the EDSR-style upsampler."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Mean RGB of DIV2K in [0, 1] (the constant EDSR, RCAN and CARN use for their mean shift).
DIV2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)

SUPPORTED_SCALES: tuple[int, ...] = (2, 3, 4)


def check_scale(scale: int, supported: tuple[int, ...] = SUPPORTED_SCALES) -> int:
    """Returns ``scale`` as an int, or raises a ``ValueError`` naming the supported scales."""
    if int(scale) != scale or int(scale) not in supported:
        raise ValueError(f"unsupported scale {scale!r}: this backbone supports ×{', ×'.join(map(str, supported))}")
    return int(scale)


def check_positive(**values: int | float) -> None:
    """Raises a ``ValueError`` for the first non-positive value (width, depth, ...)."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


class MeanShift(nn.Module):
    """Subtracts (``sign=-1``) or adds (``sign=+1``) the dataset mean RGB, scaled to the pixel range.

    The mean is a non-persistent buffer derived from the init args (not a parameter, not in the state dict),
    so a checkpoint loads into a model built with another ``pixel_range``. Input ``(N, 3, H, W)``.
    """

    def __init__(self, pixel_range: float = 1.0, sign: int = -1,
                 rgb_mean: tuple[float, float, float] = DIV2K_RGB_MEAN) -> None:
        super().__init__()
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 or +1, got {sign!r}")
        self.sign = sign
        self.register_buffer("shift", sign * pixel_range * torch.tensor(rgb_mean).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class ConvMeanShift(nn.Conv2d):
    """The mean shift as a frozen 1×1 convolution (identity weight, bias ``sign · pixel_range · mean``).

    Unlike :class:`MeanShift` its ``weight``/``bias`` are in the state dict: the layout of networks whose
    released weights store them (SMSR's ``sub_mean``/``add_mean``), so their checkpoints load key for key.
    They never train (``requires_grad`` off); cost reports do not count them as parameters.
    """

    def __init__(self, pixel_range: float = 1.0, sign: int = -1,
                 rgb_mean: tuple[float, float, float] = DIV2K_RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 or +1, got {sign!r}")
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * pixel_range * torch.tensor(rgb_mean))
        for parameter in self.parameters():
            parameter.requires_grad = False


def conv3x3(in_channels: int, out_channels: int, bias: bool = True, groups: int = 1) -> nn.Conv2d:
    """A 3×3 convolution with 'same' padding."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias, groups=groups)


class ResidualBlock(nn.Module):
    """EDSR residual block without batch norm: ``x + res_scale · conv2(relu(conv1(x)))``.

    Module names ``conv1``/``conv2`` are part of the contract (ASSL's free/constrained layers, N:M sparsity).
    The ReLU is not in-place so the block can be traced.
    """

    def __init__(self, num_features: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(num_features, num_features)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(num_features, num_features)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.conv2(self.relu(self.conv1(x)))


class Upsampler(nn.Sequential):
    """EDSR's sub-pixel upsampler: ``conv3x3(F → 4F) → PixelShuffle(2)`` twice for ×4 (and ×8 three times),
    ``conv3x3(F → 9F) → PixelShuffle(3)`` for ×3, once for ×2.

    ``activation`` (``"none"``, ``"relu"`` or ``"lrelu"``) is inserted after every shuffle (CARN uses ReLU
    after the conv, MSRResNet LeakyReLU(0.1) after the shuffle; the two are equivalent for pointwise
    activations). ``groups`` makes the convolutions grouped (CARN-M).
    """

    def __init__(self, scale: int, num_features: int, activation: str = "none", groups: int = 1) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            steps = [2] * int(math.log2(scale))
        elif scale == 3:
            steps = [3]
        else:
            raise ValueError(f"the sub-pixel upsampler supports scales 2^n and 3, got {scale!r}")
        for step in steps:
            layers.append(conv3x3(num_features, step * step * num_features, groups=groups))
            layers.append(nn.PixelShuffle(step))
            if activation == "relu":
                layers.append(nn.ReLU())
            elif activation == "lrelu":
                layers.append(nn.LeakyReLU(0.1))
            elif activation != "none":
                raise ValueError(f"unknown activation {activation!r} (none, relu, lrelu)")
        super().__init__(*layers)
