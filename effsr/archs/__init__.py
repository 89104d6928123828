"""Plain ``nn.Module`` SR backbones. Each takes ``scale: int`` first and ``pixel_range: float = 1.0``, stores
``self.scale`` / ``self.pixel_range`` and maps input in [0, pixel_range] to output in [0, pixel_range]."""

from effsr.archs.bicubic import BicubicSR
from effsr.archs.carn import CARN, CARNM
from effsr.archs.common import MeanShift, ResidualBlock, Upsampler
from effsr.archs.edsr import EDSR, LEDSR
from effsr.archs.fsrcnn import FSRCNN, FSRCNNOfficial
from effsr.archs.msrresnet import MSRResNet
from effsr.archs.rcan import RCAN

__all__ = ["BicubicSR", "CARN", "CARNM", "EDSR", "FSRCNN", "FSRCNNOfficial", "LEDSR", "MSRResNet", "MeanShift", "RCAN",
           "ResidualBlock", "Upsampler"]
