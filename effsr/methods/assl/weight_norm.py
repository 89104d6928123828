"""Weight-normalised convs: filter i = γ_i · W_i / ‖W_i‖, γ the per-filter scale ASSL ranks and regularises."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from effsr.errors import ConfigError


class WNConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose filters are ``gamma_i · weight_i / ‖weight_i‖₂`` (norm over in-channels × k × k).

    ``weight`` keeps its name (a dense state dict loads into it); ``gamma`` is one learnable scale per filter.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = nn.Parameter(self.weight.detach().flatten(1).norm(dim=1).clone())

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WNConv2d:
        """A WN conv computing exactly what ``conv`` computes (γ_i = ‖W_i‖₂)."""
        if conv.padding_mode != "zeros":
            raise ConfigError(f"ASSL supports zero-padded convs only, got padding_mode={conv.padding_mode!r}")
        wn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                 device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            wn.weight.copy_(conv.weight)
            if conv.bias is not None:
                wn.bias.copy_(conv.bias)
            wn.gamma.copy_(conv.weight.flatten(1).norm(dim=1))
        return wn

    def effective_weight(self) -> Tensor:
        """The plain conv weight this layer applies: γ_i · W_i / ‖W_i‖."""
        norm = self.weight.flatten(1).norm(dim=1).clamp_min(1e-12)
        return self.weight * (self.gamma / norm).view(-1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with γ folded into the weight."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.effective_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


def convert_to_weight_norm(network: nn.Module, names: Iterable[str]) -> None:
    """Replaces the named ``nn.Conv2d``s of ``network`` in place by :class:`WNConv2d` (output unchanged)."""
    for name in names:
        conv = network.get_submodule(name)
        if not isinstance(conv, WNConv2d):
            network.set_submodule(name, WNConv2d.from_conv(conv), strict=True)


def fold_weight_norm(network: nn.Module) -> None:
    """Replaces every :class:`WNConv2d` of ``network`` in place by a plain conv with γ folded in."""
    for name, module in list(network.named_modules()):
        if isinstance(module, WNConv2d):
            network.set_submodule(name, module.to_conv(), strict=True)


def filter_scales(conv: nn.Conv2d) -> Tensor:
    """Per-filter importance: |γ| of a WN conv, ‖W_i‖₂ of a plain conv (detached)."""
    if isinstance(conv, WNConv2d):
        return conv.gamma.detach().abs()
    return conv.weight.detach().flatten(1).norm(dim=1)

