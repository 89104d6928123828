"""Turning a backbone into N:M layers and back: which convs, their dense MACs, the cost terms, the budget fill,
export to plain (masked) convs and the experimental 2:4 semi-structured export."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from effsr.cost import count_macs, lr_size_for_720p, macs_at_720p
from effsr.errors import ConfigError
from effsr.methods.nm_sparsity.layer import NMConv2d

__all__ = ["convert_to_nm", "dense_layer_macs", "export_masked", "fill_budget", "nm_layers", "nm_macs_720p",
           "patch_cost", "sparse_cost_fraction", "sparsifiable_convs", "to_semi_structured_2to4"]



def _is_mean_shift(module: nn.Module) -> bool:
    return type(module).__name__ == "MeanShift"



def meta_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` on the meta device (shapes only), made without copying its parameters' and buffers'
    data first (``copy.deepcopy(network).to("meta")`` copied every tensor only to drop it)."""
    memo: dict[int, Any] = {}
    for tensor in (*network.parameters(), *network.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(network, memo).to("meta")



def sparsifiable_convs(network: nn.Module, m: int) -> list[str]:
    """Names of the convs that become N:M: every conv in forward order except the first and the last
    (and except mean shifts and convs whose input channels per group are not a multiple of M)."""
    order: list[str] = []
    meta = meta_copy(network)
    names = {module: name for name, module in meta.named_modules()}
    handles = [module.register_forward_pre_hook(lambda mod, _args: order.append(names[mod]))
               for module in meta.modules() if isinstance(module, nn.Conv2d) and not _is_mean_shift(module)]
    try:
        with torch.no_grad():
            meta(torch.zeros(1, 3, 16, 16, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    unique = list(dict.fromkeys(order))
    inner = unique[1:-1]
    modules = dict(network.named_modules())
    return [name for name in inner if (modules[name].in_channels // modules[name].groups) % m == 0]



def dense_layer_macs(network: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Dense MACs of each named conv for a 1280×720 HR output (effsr.cost on a meta copy, shapes only)."""
    meta = meta_copy(network)
    modules = dict(meta.named_modules())
    inputs: dict[str, torch.Size] = {}

    def recorder(key: str) -> Any:
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs.setdefault(key, args[0].shape)
        return record

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in names]
    try:
        height, width = lr_size_for_720p(int(network.scale))
        with torch.no_grad():
            meta(torch.zeros(1, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    result: dict[str, int] = {}
    for name in names:
        plain = modules[name]
        conv = nn.Conv2d(plain.in_channels, plain.out_channels, plain.kernel_size, stride=plain.stride,
                         padding=plain.padding, dilation=plain.dilation, groups=plain.groups, device="meta")
        result[name] = count_macs(conv, torch.zeros(inputs[name], device="meta"))
    return result



def nm_macs_720p(network: nn.Module, scale: int | None = None) -> tuple[int, int]:
    """(MACs for a 1280×720 output with each N:M layer at N/M of its dense MACs, the same network dense).

    The dense count runs on a meta copy (shapes only) whose N:M layers compute as their dense convs; the N:M
    layers' share is then replaced by ``dense_macs · N // M`` per layer (what the sparse kernels would do).
    """
    layers = nm_layers(network)
    plain = meta_copy(network)
    for layer in nm_layers(plain).values():
        layer.enabled = False  # counts the dense conv
    dense = macs_at_720p(plain, scale, device="meta")
    dense_layers = sum(int(layer.dense_macs) for layer in layers.values())
    sparse = sum(int(layer.dense_macs) * layer.n // layer.m for layer in layers.values())
    return dense - dense_layers + sparse, dense



def convert_to_nm(network: nn.Module, m: int, score_max: float = 1.03) -> list[str]:
    """Replaces the sparsifiable convs of ``network`` in place by :class:`NMConv2d`; returns their names."""
    names = sparsifiable_convs(network, m)
    if not names:
        raise ConfigError(f"{type(network).__name__} has no conv (besides the first/last) with input channels "
                          f"divisible by M={m}")
    macs = dense_layer_macs(network, names)
    for name in names:
        layer = NMConv2d.from_conv(network.get_submodule(name), m, score_max)
        layer.dense_macs.fill_(macs[name])
        network.set_submodule(name, layer, strict=True)
    return names



def nm_layers(network: nn.Module) -> dict[str, NMConv2d]:
    return {name: module for name, module in network.named_modules() if isinstance(module, NMConv2d)}



def sparse_cost_fraction(network: nn.Module, differentiable: bool = True) -> Tensor:
    """Σ (N/M)·dense MACs / Σ dense MACs over the N:M layers (differentiable through the STE)."""
    layers = list(nm_layers(network).values())
    dense = sum(float(layer.dense_macs) for layer in layers)
    if differentiable:
        total = sum(layer.soft_n() / layer.m * float(layer.dense_macs) for layer in layers)
        return total / dense
    return torch.tensor(sum(layer.n / layer.m * float(layer.dense_macs) for layer in layers) / dense)



def patch_cost(network: nn.Module) -> tuple[Tensor, int]:
    """(Σ (N/M)·dense MACs per image of the last forward, differentiable; Σ dense MACs per image): the
    official SLS cost, in MACs of one training patch (``compute_costs`` of the official code)."""
    layers = list(nm_layers(network).values())
    dense = sum(layer.image_macs() for layer in layers)
    return sum(layer.soft_n() / layer.m * float(layer.image_macs()) for layer in layers), dense



def fill_budget(layers: Sequence[NMConv2d], budget: float) -> dict[int, int]:
    """Raises N, one unit at a time, while the N:M layers' cost stays ≤ ``budget`` of their dense MACs.

    The unit added next is the one with the lowest cost per keep probability: for layer l at N_l its next unit
    costs dense_l/M and ranks p_{l,N_l} (the cumulative score product, unit N_l); ties go to the earlier layer.
    Returns {layer index: N}. Without it a search that stops below budget (one unit of a big layer can be a few
    % of the cost) leaves "equal MACs" comparisons off by that much.
    """
    ns = [layer.n for layer in layers]
    dense = [float(layer.dense_macs) for layer in layers]
    target = budget * sum(dense)
    cost = sum(n / layer.m * d for n, layer, d in zip(ns, layers, dense, strict=True))
    with torch.no_grad():
        probabilities = [layer.keep_probabilities().tolist() for layer in layers]
    while True:
        best, best_key = -1, math.inf
        for index, layer in enumerate(layers):
            step = dense[index] / layer.m
            if ns[index] >= layer.m or cost + step > target * (1 + 1e-12):
                continue
            key = step / max(probabilities[index][ns[index] - 1], 1e-12)
            if key < best_key:
                best, best_key = index, key
        if best < 0:
            return dict(enumerate(ns))
        cost += dense[best] / layers[best].m
        ns[best] += 1



def export_masked(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every N:M layer replaced by a plain conv holding the masked weights."""
    exported = copy.deepcopy(network)
    for name, layer in nm_layers(exported).items():
        exported.set_submodule(name, layer.to_dense_conv(), strict=True)
    return exported



def to_semi_structured_2to4(network: nn.Module) -> nn.Module:
    """EXPERIMENTAL: 2:4 layers → torch semi-structured sparse weights (CUDA only; 1×1 convs as linear maps).

    Stock 2:4 kernels rarely speed up SR-sized convs; this is for experiments. Raises on CPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured sparsity needs a CUDA GPU with sparse tensor cores (sm80+); "
                           "use export_masked() on CPU")
    from torch.sparse import to_sparse_semi_structured

    exported = export_masked(network).cuda().half()
    for name, layer in nm_layers(network).items():
        if layer.m != 4 or layer.n != 2 or layer.kernel_size != (1, 1):
            continue
        conv = exported.get_submodule(name)
        conv.weight = nn.Parameter(to_sparse_semi_structured(conv.weight.detach().flatten(1)), requires_grad=False)
    return exported

