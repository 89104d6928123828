"""EDSR and LEDSR (EDSR with ASSL's light one-conv upsampler).

Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPRW 2017.
Zhang et al., "Aligned Structured Sparsity Learning for Efficient Image Super-Resolution", NeurIPS 2021 (LEDSR).
"""

from __future__ import annotations

from torch import Tensor, nn

from effsr.archs.common import MeanShift, ResidualBlock, Upsampler, check_positive, check_scale, conv3x3


class EDSR(nn.Module):
    """EDSR: mean shift → head conv → ``num_blocks`` residual blocks → body conv (+ head) → upsampler → tail conv.

    Published sizes: EDSR-baseline (F=64, R=16, res_scale 1) ×4 has 1,517,571 params ("1.5 M");
    full EDSR is F=256, R=32, res_scale 0.1 (43.1 M at ×4).
    Module names: ``head``, ``blocks[i].conv1/conv2``, ``body_conv``, ``upsampler``, ``tail``.
    """

    def __init__(self, scale: int, num_features: int = 64, num_blocks: int = 16, res_scale: float = 1.0,
                 pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, num_blocks=num_blocks, pixel_range=pixel_range)
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.sub_mean = MeanShift(pixel_range, sign=-1)
        self.head = conv3x3(3, num_features)
        self.blocks = nn.Sequential(*(ResidualBlock(num_features, res_scale) for _ in range(num_blocks)))
        self.body_conv = conv3x3(num_features, num_features)
        self.upsampler = Upsampler(self.scale, num_features)
        self.tail = conv3x3(num_features, 3)
        self.add_mean = MeanShift(pixel_range, sign=1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        features = features + self.body_conv(self.blocks(features))
        return self.add_mean(self.tail(self.upsampler(features)))


class LEDSR(nn.Module):
    """LEDSR, ASSL's backbone: EDSR with a single ``conv3x3(F → 3·s²) → PixelShuffle(s)`` upsampler.

    mean shift → ``head`` conv3x3(3→F) → R × [``blocks[i].conv1`` → ReLU → ``blocks[i].conv2``, ×res_scale, + x]
    → ``body_conv`` (+ head output) → ``tail_conv`` conv3x3(F→3·s²) → PixelShuffle(s) → add mean.

    Paper setting F=256, R=16: 19.59 M params at ×4; ASSL prunes it to 49 filters per layer
    ("ASSLN-F49": 0.72 M at ×2, 0.74 M at ×4). :meth:`prunable_layers` lists which convs are "free"
    (choose their own pruned filters) and which are "constrained" (summed through the skip path, so they
    must drop the same channel indices); ``tail_conv`` only loses input channels.
    """

    def __init__(self, scale: int, num_features: int = 256, num_blocks: int = 16, res_scale: float = 1.0,
                 pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, num_blocks=num_blocks, pixel_range=pixel_range)
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.sub_mean = MeanShift(pixel_range, sign=-1)
        self.head = conv3x3(3, num_features)
        self.blocks = nn.Sequential(*(ResidualBlock(num_features, res_scale) for _ in range(num_blocks)))
        self.body_conv = conv3x3(num_features, num_features)
        self.tail_conv = conv3x3(num_features, 3 * self.scale * self.scale)
        self.shuffle = nn.PixelShuffle(self.scale)
        self.add_mean = MeanShift(pixel_range, sign=1)

    def prunable_layers(self) -> dict[str, list[str]]:
        """Qualified names (``named_modules``) of the prunable convs, grouped by ASSL's layer kind.

        ``free``: the first conv of every block; ``constrained``: head, every block's conv2 and body_conv
        (their outputs are added together, so their kept output channels must be aligned);
        ``input_only``: the upsampler conv, whose input channels follow the constrained set.
        """
        return {
            "free": [f"blocks.{index}.conv1" for index in range(len(self.blocks))],
            "constrained": ["head", *(f"blocks.{index}.conv2" for index in range(len(self.blocks))), "body_conv"],
            "input_only": ["tail_conv"],
        }

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        features = features + self.body_conv(self.blocks(features))
        return self.add_mean(self.shuffle(self.tail_conv(features)))
