"""Inference-time (deploy) form of a network: each convolution fused with the activation that follows it.

On CPU, a ReLU/LeakyReLU after a convolution is a separate pass over a tensor as large as the convolution's
output, uncounted in MACs and proportionally more expensive the narrower the network (MACs grow with F², that
pass with F). oneDNN applies the activation inside the convolution (a post-op) instead. :func:`fuse_conv_activations`
rewrites a traced copy of the network so that every ``nn.Conv2d`` whose only consumer is an activation (directly,
or through a ``PixelShuffle``: an elementwise activation commutes with it) runs as one fused call. Output is the
same up to float rounding (measured bit-identical for MSRResNet), the parameters are shared with the original
(no copy, so the deployed form always sees the current weights), and a network that cannot be traced, or a
conv on another device/dtype/with gradients, runs as before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu)
_SHUFFLES = (F.pixel_shuffle, torch.pixel_shuffle)


class FusedConvActivation(nn.Module):
    """``activation(conv(x))`` as one oneDNN call (CPU, float32, no autograd); the plain two steps otherwise."""

    def __init__(self, conv: nn.Conv2d, negative_slope: float) -> None:
        super().__init__()
        self.conv = conv
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            attr, scalars = ("relu", []) if self.negative_slope == 0 else ("leaky_relu", [self.negative_slope])
            return torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, attr, scalars, "")
        return F.leaky_relu(conv(x), self.negative_slope)


def _fusable_conv(module: nn.Module) -> bool:
    """Exactly ``nn.Conv2d`` (a subclass may compute something else from its weight) with zero padding."""
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _negative_slope(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """The activation's negative slope (0 for ReLU), or None when ``node`` is not a ReLU/LeakyReLU."""
    if node.op == "call_module" and type(modules[str(node.target)]) in _ACTIVATION_MODULES:
        module = modules[str(node.target)]
        return float(module.negative_slope) if isinstance(module, nn.LeakyReLU) else 0.0
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        if node.target in (F.relu, torch.relu):
            return 0.0
        slope: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return float(slope) if isinstance(slope, (int, float)) else None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0
    return None


def _is_shuffle(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[str(node.target)]) is nn.PixelShuffle
    return node.op == "call_function" and node.target in _SHUFFLES


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fuse_conv_activations(network: nn.Module) -> nn.Module:
    """The deploy form of ``network`` (see the module docstring); ``network`` itself when nothing fuses or it
    cannot be symbolically traced. The result shares ``network``'s parameters and is for inference only."""
    try:
        traced = fx.symbolic_trace(network)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: keep the plain network
        return network
    modules = dict(traced.named_modules())
    fused = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not _fusable_conv(modules[str(node.target)]):
            continue
        user = _only_user(node)
        shuffle = user if user is not None and _is_shuffle(user, modules) else None
        activation = _only_user(shuffle) if shuffle is not None else user
        slope = None if activation is None else _negative_slope(activation, modules)
        if slope is None:
            continue
        name = f"_fused_conv_act_{fused}"
        traced.add_submodule(name, FusedConvActivation(modules[str(node.target)], slope))
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        # the activation's consumers now read the conv's (or the shuffle's) output, already activated
        activation.replace_all_uses_with(shuffle if shuffle is not None else replacement)
        traced.graph.erase_node(activation)
        traced.graph.erase_node(node)
        fused += 1
    if not fused:
        return network
    traced.graph.lint()
    traced.recompile()
    return traced


# value None: nothing fused (holding ``network`` itself as the value would keep the key alive forever)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module | None]] = weakref.WeakKeyDictionary()


def deployed(network: nn.Module) -> nn.Module:
    """:func:`fuse_conv_activations` of ``network``, traced once and reused while its module tree is the same
    (the same submodule objects: a replaced layer re-traces; new weights need nothing, they are shared)."""
    structure = tuple(id(module) for module in network.modules())
    cached = _CACHE.get(network)
    if cached is None or cached[0] != structure:
        fused = fuse_conv_activations(network)
        cached = (structure, None if fused is network else fused)
        _CACHE[network] = cached
    return network if cached[1] is None else cached[1]


__all__ = ["FusedConvActivation", "deployed", "fuse_conv_activations"]
