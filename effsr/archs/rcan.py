"""RCAN: residual channel attention network.

Zhang et al., "Image Super-Resolution Using Very Deep Residual Channel Attention Networks", ECCV 2018.
"""

from __future__ import annotations

from torch import Tensor, nn

from effsr.archs.common import MeanShift, Upsampler, check_positive, check_scale, conv3x3


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: global average pool → 1×1 (F → F/r) → ReLU → 1×1 (F/r → F) → sigmoid, × x.

    The squeezed width is ``max(1, F // reduction)`` (ClassSR's widths 36/50 give 2/3 channels at r=16).
    """

    def __init__(self, num_features: int, reduction: int = 16) -> None:
        super().__init__()
        squeezed = max(1, num_features // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(num_features, squeezed, 1)
        self.relu = nn.ReLU()
        self.excite = nn.Conv2d(squeezed, num_features, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.excite(self.relu(self.squeeze(self.pool(x)))))


class RCAB(nn.Module):
    """Residual channel attention block: ``x + CA(conv2(relu(conv1(x))))``."""

    def __init__(self, num_features: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv1 = conv3x3(num_features, num_features)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(num_features, num_features)
        self.attention = ChannelAttention(num_features, reduction)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.conv2(self.relu(self.conv1(x))))


class ResidualGroup(nn.Module):
    """``num_blocks`` RCABs followed by a conv3x3, with a group-level skip."""

    def __init__(self, num_features: int, num_blocks: int, reduction: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(RCAB(num_features, reduction) for _ in range(num_blocks)))
        self.conv = conv3x3(num_features, num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(self.blocks(x))


class RCAN(nn.Module):
    """RCAN: mean shift → head conv → ``num_groups`` residual groups → body conv (+ head) → EDSR upsampler →
    tail conv → add mean.

    Published size: F=64, 10 groups × 20 RCABs, reduction 16, ×4: 15,592,355 params ("15.6 M").
    ClassSR's branches use F = 36/50/64. Module names: ``head``, ``groups[g].blocks[b].conv1/conv2/attention``,
    ``groups[g].conv``, ``body_conv``, ``upsampler``, ``tail``.
    """

    def __init__(self, scale: int, num_features: int = 64, num_groups: int = 10, num_blocks: int = 20,
                 reduction: int = 16, pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, num_groups=num_groups, num_blocks=num_blocks,
                       reduction=reduction, pixel_range=pixel_range)
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.sub_mean = MeanShift(pixel_range, sign=-1)
        self.head = conv3x3(3, num_features)
        self.groups = nn.Sequential(*(ResidualGroup(num_features, num_blocks, reduction) for _ in range(num_groups)))
        self.body_conv = conv3x3(num_features, num_features)
        self.upsampler = Upsampler(self.scale, num_features)
        self.tail = conv3x3(num_features, 3)
        self.add_mean = MeanShift(pixel_range, sign=1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        features = features + self.body_conv(self.groups(features))
        return self.add_mean(self.tail(self.upsampler(features)))
