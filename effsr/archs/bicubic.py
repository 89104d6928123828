"""Parameter-free MATLAB-bicubic upsampling: the baseline every SR table starts from."""

from __future__ import annotations

from torch import Tensor, nn

from effsr.archs.common import check_scale


class BicubicSR(nn.Module):
    """Upsamples by ``scale`` with the MATLAB-compatible antialiased bicubic ``imresize`` (docs/protocol.md).

    No parameters. The resize is linear, so the output is in the input's range (``pixel_range`` is only
    recorded); values slightly outside the range (bicubic overshoot) are left to the metrics' clamp.
    """

    def __init__(self, scale: int, pixel_range: float = 1.0) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.pixel_range = float(pixel_range)

    def forward(self, x: Tensor) -> Tensor:
        # Imported here so effsr.archs stays importable without effsr.ops' resize dependencies.
        from effsr.ops.imresize import imresize

        return imresize(x, scale=self.scale)
