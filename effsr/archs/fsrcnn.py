"""FSRCNN (RGB, as ClassSR uses it).

Dong et al., "Accelerating the Super-Resolution Convolutional Neural Network", ECCV 2016.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from effsr.archs.common import check_positive, check_scale


class FSRCNN(nn.Module):
    """FSRCNN(d, s, m): 5×5 feature extraction (3→d) → 1×1 shrink (d→s) → m × 3×3 mapping (s→s) →
    1×1 expand (s→d), each followed by a per-channel PReLU → 9×9 transposed conv (d→3, stride = scale).

    The deconvolution's padding/output_padding are chosen so the output is exactly ``scale ×`` the input:
    padding = ceil((9 − s) / 2), output_padding = 2·padding − (9 − s) (×4: 3 and 1, as in ClassSR).
    Published size: d=56, s=12, m=4 on RGB at ×4 has 24,683 params (≈ 25 K; the paper's 12.5 K is the
    single-channel Y model without biases/PReLU). ClassSR's branches use d = 16/36/56.
    No mean shift; ``pixel_range`` only records the range the weights expect.
    Module names: ``extract``, ``shrink``, ``mapping``, ``expand``, ``deconv``.
    """

    def __init__(self, scale: int, num_features: int = 56, shrink_features: int = 12, num_mapping: int = 4,
                 pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, shrink_features=shrink_features, pixel_range=pixel_range)
        if num_mapping < 0:
            raise ValueError(f"num_mapping must be >= 0, got {num_mapping!r}")
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.extract = nn.Sequential(nn.Conv2d(3, num_features, 5, padding=2), nn.PReLU(num_features))
        self.shrink = nn.Sequential(nn.Conv2d(num_features, shrink_features, 1), nn.PReLU(shrink_features))
        mapping: list[nn.Module] = []
        for _ in range(num_mapping):
            mapping += [nn.Conv2d(shrink_features, shrink_features, 3, padding=1), nn.PReLU(shrink_features)]
        self.mapping = nn.Sequential(*mapping)
        self.expand = nn.Sequential(nn.Conv2d(shrink_features, num_features, 1), nn.PReLU(num_features))
        padding = math.ceil((9 - self.scale) / 2)
        self.deconv = nn.ConvTranspose2d(num_features, 3, 9, stride=self.scale, padding=padding,
                                         output_padding=2 * padding - (9 - self.scale))
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's initialisation: He-normal convs, N(0, 0.001) deconvolution, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.deconv.weight, 0.0, 0.001)
        nn.init.zeros_(self.deconv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(self.expand(self.mapping(self.shrink(self.extract(x)))))


class FSRCNNOfficial(nn.Module):
    """FSRCNN as the official ClassSR code builds it (``FSRCNN_net``): what the ClassSR-FSRCNN configs use.

    Differences from :class:`FSRCNN` (which follows the FSRCNN paper): the ``num_mapping`` 3×3 mapping convs
    are linear (no activation between them) and followed by ONE PReLU; every PReLU has a single shared slope
    (``nn.PReLU()``); weights are Kaiming-normal (fan-in) × 0.1 with zero biases on the convs, the
    deconvolution keeps PyTorch's default initialisation. That changes what the network learns, not only the
    key names. Module names are the official ones (``head_conv``, ``body_conv``, ``tail_conv``), so its state
    dicts load directly. ×4, d=56, s=12, m=4 on RGB: 24,515 parameters.
    """

    def __init__(self, scale: int, num_features: int = 56, shrink_features: int = 12, num_mapping: int = 4,
                 pixel_range: float = 1.0) -> None:
        super().__init__()
        check_positive(num_features=num_features, shrink_features=shrink_features, pixel_range=pixel_range)
        if num_mapping < 0:
            raise ValueError(f"num_mapping must be >= 0, got {num_mapping!r}")
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)
        self.head_conv = nn.Sequential(nn.Conv2d(3, num_features, 5, padding=2), nn.PReLU())
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(num_features, shrink_features, 1), nn.PReLU())]
        layers += [nn.Conv2d(shrink_features, shrink_features, 3, padding=1) for _ in range(num_mapping)]
        layers += [nn.PReLU(), nn.Sequential(nn.Conv2d(shrink_features, num_features, 1), nn.PReLU())]
        self.body_conv = nn.Sequential(*layers)
        padding = math.ceil((9 - self.scale) / 2)  # ×4: 3 and 1, the official values
        self.tail_conv = nn.ConvTranspose2d(num_features, 3, 9, stride=self.scale, padding=padding,
                                            output_padding=2 * padding - (9 - self.scale))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                module.weight.data.mul_(0.1)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail_conv(self.body_conv(self.head_conv(x)))
