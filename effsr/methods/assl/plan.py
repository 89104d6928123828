"""Pruning plan: how many filters a layer keeps and which ones (largest |γ|)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from effsr.errors import ConfigError
from effsr.methods.assl.channels import ChannelGroup, ChannelStructure
from effsr.methods.assl.weight_norm import WNConv2d, filter_scales

Ranking = Literal["first", "sum"]
Criterion = Literal["scale", "l1_norm"]
CRITERIA = ("scale", "l1_norm")


def num_kept(channels: int, ratio: float | None = None, keep: int | None = None,
             multiple_of: int | None = None) -> int:
    """Filters kept in a layer of ``channels`` filters.

    ``keep`` (absolute) wins over ``ratio``; with a ratio, ``min(ceil(ratio·N), N−1)`` filters are pruned
    (at least one survives). ``multiple_of`` rounds the kept count to the nearest multiple (ties up; at
    least one multiple, at most ``channels``) for hardware-friendly widths.
    """
    if keep is not None:
        if keep < 1:
            raise ConfigError(f"ASSL keep must be ≥ 1, got {keep}")
        kept = min(int(keep), channels)
    elif ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"ASSL prune_ratio must be in [0, 1), got {ratio}")
        kept = channels - min(math.ceil(ratio * channels - 1e-9), channels - 1)
    else:
        raise ConfigError("give ASSL either prune_ratio or keep")
    if multiple_of:
        kept = max(multiple_of, int(math.floor(kept / multiple_of + 0.5)) * multiple_of)
        kept = min(kept, channels)
    return kept


def top_indices(importance: Tensor, count: int) -> list[int]:
    """Sorted indices of the ``count`` largest entries (ties broken by the lower index)."""
    order = torch.argsort(-importance.double().cpu(), stable=True)[:count]
    return sorted(int(index) for index in order)


def filter_l1(conv: nn.Conv2d) -> Tensor:
    """Per-filter mean |W| of the weight the conv applies (γ folded in a WN conv): the L1-norm pruning criterion
    (official ``l1_pruner``), detached."""
    weight = conv.effective_weight() if isinstance(conv, WNConv2d) else conv.weight
    return weight.detach().abs().flatten(1).mean(dim=1)


def group_importance(network: nn.Module, group: ChannelGroup, ranking: Ranking = "first",
                     criterion: Criterion = "scale") -> Tensor:
    """Importance of a group's channels: its first producer's score (paper) or the sum over producers.

    The score is |γ| (``scale``: ASSL; ‖W_i‖ of a plain conv) or the per-filter mean |W| (``l1_norm``: the
    L1-norm pruning baseline, constrained groups aligned to their first layer as the official code does).
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown ASSL prune_criterion {criterion!r} ({', '.join(CRITERIA)})")
    score = filter_scales if criterion == "scale" else filter_l1
    if ranking == "first" or not group.constrained:
        return score(network.get_submodule(group.producers[0]))
    if ranking == "sum":
        return torch.stack([score(network.get_submodule(name)) for name in group.producers]).sum(dim=0)
    raise ConfigError(f"unknown ASSL constrained_ranking {ranking!r} (first, sum)")


def compute_plan(network: nn.Module, structure: ChannelStructure, ratio: float | None = None,
                 keep: int | None = None, multiple_of: int | None = None, ranking: Ranking = "first",
                 groups: Iterable[ChannelGroup] | None = None) -> dict[str, list[int]]:
    """Kept channel indices per group key (first producer's name), ranked by |γ| (or ‖W_i‖ when dense)."""
    plan: dict[str, list[int]] = {}
    for group in structure.groups if groups is None else groups:
        count = num_kept(group.channels, ratio, keep, multiple_of)
        plan[group.key] = top_indices(group_importance(network, group, ranking), count)
    return plan


def pruned_indices(channels: int, kept: Sequence[int]) -> list[int]:
    """The complement of ``kept`` in ``range(channels)``."""
    kept_set = set(kept)
    return [index for index in range(channels) if index not in kept_set]



def scale_stats(network: nn.Module, structure: ChannelStructure,
                plan: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per group of a planned network (before the prune): mean |γ| (‖W_i‖ of a plain conv) of its kept and its
    pruned filters over all producers, and the largest pruned over the smallest kept: how far the penalty drove
    the pruned filters down before they are removed."""
    stats: dict[str, dict[str, float]] = {}
    for group in structure.groups:
        pruned = torch.tensor(pruned_indices(group.channels, plan[group.key]), dtype=torch.long)
        if len(pruned) == 0:
            continue
        kept = torch.tensor(plan[group.key], dtype=torch.long)
        scales = torch.stack([filter_scales(network.get_submodule(name)).float().cpu() for name in group.producers])
        stats[group.key] = {"kept_mean": float(scales[:, kept].mean()), "pruned_mean": float(scales[:, pruned].mean()),
                            "pruned_max_over_kept_min": float(scales[:, pruned].max() / scales[:, kept].min())}
    return stats
