"""The N:M layer: :class:`NMConv2d` keeps N of every M consecutive input-channel weights, N learned.

Every group of M consecutive input channels (per output channel and kernel position) keeps its N largest weights.
The rank of every weight inside its group is stored once as a ``uint8`` buffer (the official code keeps M masked
copies of the weight, which makes checkpoints ~M× larger). N is learned per layer: M−1 priority scores k (init 1,
clamped to [0, ``score_max``] in the forward), keep probability p_j = Π_{i≤j} k_i of unit j (the j-th largest
weight of every group), hard keep b_j = 1[p_j > 0.5] with the straight-through estimator b − p.detach() + p;
unit 0 is always kept so N = 1 + Σ b_j.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from effsr.errors import ConfigError

__all__ = ["NMConv2d", "group_view", "magnitude_ranks", "ungroup_view"]


def group_view(weight: Tensor, m: int) -> Tensor:
    """(C_out, C_in, kh, kw) → (C_out, C_in/M, kh, kw, M): groups of M consecutive input channels last."""
    c_out, c_in, kh, kw = weight.shape
    return weight.reshape(c_out, c_in // m, m, kh, kw).permute(0, 1, 3, 4, 2)


def ungroup_view(grouped: Tensor) -> Tensor:
    """Inverse of :func:`group_view`."""
    c_out, groups, kh, kw, m = grouped.shape
    return grouped.permute(0, 1, 4, 2, 3).reshape(c_out, groups * m, kh, kw)


def magnitude_ranks(weight: Tensor, m: int) -> Tensor:
    """Rank (0 = largest |w|) of every weight inside its group of M input channels, as uint8, weight's shape."""
    order = group_view(weight.detach().abs(), m).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=weight.device).expand_as(order).contiguous())
    return ungroup_view(ranks).to(torch.uint8)



class NMConv2d(nn.Conv2d):
    """A conv whose weight keeps N of every M consecutive input-channel weights, N learned (or fixed).

    State: ``weight``/``bias`` (dense values), ``rank`` (uint8 rank per weight), ``scores`` (M−1 priorities),
    ``dense_macs`` (MACs of the dense layer for a 1280×720 output, measured once). ``fixed_n`` is set when the
    pattern is frozen (finetune, one-shot, SR-STE); ``enabled=False`` makes the layer dense (dense pretraining).
    """

    def __init__(self, *args: Any, m: int = 8, score_max: float = 1.03, rank_weights: bool = True,
                 **kwargs: Any) -> None:
        """``rank_weights=False``: ``rank`` starts at 0 (``from_conv`` ranks the copied weights instead of the
        fresh init, which it would overwrite)."""
        super().__init__(*args, **kwargs)
        in_per_group = self.in_channels // self.groups
        if in_per_group % m:
            raise ConfigError(f"N:M with M={m} needs input channels per group divisible by M, got {in_per_group}")
        self.m = m
        self.score_max = score_max
        self.scores = nn.Parameter(torch.ones(m - 1))
        rank = magnitude_ranks(self.weight, m) if rank_weights else torch.zeros_like(self.weight, dtype=torch.uint8)
        self.register_buffer("rank", rank)
        self.register_buffer("dense_macs", torch.zeros((), dtype=torch.int64))
        self.fixed_n: int | None = None
        self.straight_through_dense = False
        self.enabled = True
        self._last_macs = 0
        self._last_n = m
        self._last_image_macs = 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, m: int, score_max: float = 1.03) -> NMConv2d:
        """An N:M layer with the conv's hyper-parameters and weights (N = M until scores drop)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, m=m, score_max=score_max, rank_weights=False,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.rerank()
        return layer

    @torch.no_grad()
    def rerank(self) -> None:
        """Recomputes the magnitude rank of every weight in its group."""
        self.rank.copy_(magnitude_ranks(self.weight, self.m))

    @torch.no_grad()
    def clamp_scores(self) -> None:
        self.scores.clamp_(0.0, self.score_max)

    def keep_probabilities(self) -> Tensor:
        """p_j for units 1..M−1: cumulative products of the clamped scores."""
        return torch.cumprod(self.scores.clamp(0.0, self.score_max), dim=0)

    def unit_keep(self) -> Tensor:
        """(M,) keep value per unit; STE (b − p.detach() + p) while searching, exact 0/1 once frozen."""
        if self.fixed_n is not None:
            return (torch.arange(self.m, device=self.scores.device) < self.fixed_n).to(self.weight.dtype)
        probabilities = self.keep_probabilities()
        hard = (probabilities > 0.5).to(probabilities.dtype)
        ste = hard - probabilities.detach() + probabilities
        return torch.cat([torch.ones(1, device=ste.device, dtype=ste.dtype), ste])

    def soft_n(self) -> Tensor:
        """N as a differentiable scalar (value = the integer N)."""
        return self.unit_keep().sum()

    @property
    def n(self) -> int:
        """Current N (kept weights per group of M)."""
        if self.fixed_n is not None:
            return self.fixed_n
        if self.scores.device.type == "meta":
            return self._last_n
        return 1 + int((self.keep_probabilities() > 0.5).sum())

    def mask(self) -> Tensor:
        """Weight-shaped mask: unit_keep gathered at each weight's rank (gradients reach the scores)."""
        return self.unit_keep()[self.rank.long()]

    def sparse_weight(self) -> Tensor:
        """The weight the layer applies (masked); SR-STE passes dense gradients to pruned weights."""
        if not self.enabled:
            return self.weight
        mask = self.mask()
        if self.straight_through_dense:
            return self.weight * mask + (self.weight - self.weight.detach()) * (1.0 - mask)
        return self.weight * mask

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "meta":
            self._last_n = self.n
        output = self._conv_forward(x, self.sparse_weight(), self.bias)
        per_output = self.kernel_size[0] * self.kernel_size[1] * (self.in_channels // self.groups)
        dense = per_output * output.numel()
        self._last_macs = dense * (self._last_n if self.enabled else self.m) // self.m
        self._last_image_macs = per_output * output[0].numel() if output.dim() == 4 else dense
        return output

    def image_macs(self) -> int:
        """Dense MACs of this layer for ONE image of the last forward (the official cost unit: per training
        patch, ``op_per_position · h_out · w_out``)."""
        return self._last_image_macs

    def reported_macs(self) -> int:
        """MACs the N:M execution of the last forward performs (effsr.cost hook): N/M of the dense conv."""
        return self._last_macs

    def freeze(self, n: int | None = None) -> None:
        """Fixes N (default: the current learned N) and the pattern; scores stop training."""
        self.fixed_n = int(self.n if n is None else n)
        self._last_n = self.fixed_n
        self.scores.requires_grad_(False)

    def to_dense_conv(self) -> nn.Conv2d:
        """A plain conv holding the masked weights (the exported layer)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.sparse_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

