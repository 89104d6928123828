"""Physical pruning: masked, compact (channels removed) and checkpoint-shaped networks."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from effsr.errors import CheckpointError
from effsr.methods.assl.channels import ChannelStructure
from effsr.methods.assl.plan import pruned_indices
from effsr.methods.assl.weight_norm import WNConv2d, fold_weight_norm


def mask_network(network: nn.Module, structure: ChannelStructure, plan: dict[str, list[int]]) -> None:
    """Zeroes the pruned filters (γ or weight, and bias) in place: the "masked" model."""
    with torch.no_grad():
        for group in structure.groups:
            pruned = pruned_indices(group.channels, plan[group.key])
            for name in group.producers:
                conv = network.get_submodule(name)
                (conv.gamma if isinstance(conv, WNConv2d) else conv.weight)[pruned] = 0
                if conv.bias is not None:
                    conv.bias[pruned] = 0


def prune_network(network: nn.Module, structure: ChannelStructure, plan: dict[str, list[int]]) -> nn.Module:
    """A copy of ``network`` with γ folded and pruned filters physically removed (plain ``nn.Conv2d``s).

    Producers keep their plan's output channels; consumers keep the matching input channels (e.g. the
    upsampler conv). The result equals the masked model (:func:`mask_network`) up to float error.
    """
    compact = copy.deepcopy(network)
    fold_weight_norm(compact)
    kept_out: dict[str, list[int]] = {}
    kept_in: dict[str, list[int]] = {}
    for group in structure.groups:
        for name in group.producers:
            kept_out[name] = plan[group.key]
        for name in group.consumers:
            kept_in[name] = plan[group.key]
    for name in dict.fromkeys([*kept_out, *kept_in]):
        conv = compact.get_submodule(name)
        out_index = torch.tensor(kept_out.get(name, range(conv.out_channels)), dtype=torch.long)
        in_index = torch.tensor(kept_in.get(name, range(conv.in_channels)), dtype=torch.long)
        smaller = nn.Conv2d(len(in_index), len(out_index), conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                            device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            smaller.weight.copy_(conv.weight[out_index.to(conv.weight.device)][:, in_index.to(conv.weight.device)])
            if conv.bias is not None:
                smaller.bias.copy_(conv.bias[out_index.to(conv.bias.device)])
        compact.set_submodule(name, smaller, strict=True)
    return compact


def conv_shapes(network: nn.Module) -> dict[str, list[int]]:
    """``{conv name: [out_channels, in_channels]}`` of every conv (what :func:`apply_shapes` needs)."""
    return {name: [module.out_channels, module.in_channels] for name, module in network.named_modules()
            if isinstance(module, nn.Conv2d)}


def apply_shapes(network: nn.Module, shapes: dict[str, Sequence[int]]) -> None:
    """Replaces convs in place by plain convs of the given ``[out, in]`` widths (values come from a state dict)."""
    for name, (out_channels, in_channels) in shapes.items():
        try:
            conv = network.get_submodule(name)
        except AttributeError as error:
            raise CheckpointError(f"the ASSL plan names conv '{name}', which the configured network lacks: "
                                  "is model.network the one the checkpoint was trained with?") from error
        if (conv.out_channels, conv.in_channels) == (out_channels, in_channels) and type(conv) is nn.Conv2d:
            continue
        network.set_submodule(name, nn.Conv2d(
            int(in_channels), int(out_channels), conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, device=conv.weight.device,
            dtype=conv.weight.dtype), strict=True)



def reinitialize(network: nn.Module) -> None:
    """Re-initialises every conv in module order with its own ``reset_parameters()`` (the network's default init
    at the conv's current fan-in): the pruned architecture trained from scratch (official ``--reinit``, which uses
    Kaiming-normal instead)."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
