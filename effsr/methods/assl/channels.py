"""Channel analysis: which convs share a channel space (free / constrained layers), traced with torch.fx."""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


@dataclass
class ChannelGroup:
    """Convs whose output channels share one channel space (tied by residual additions).

    ``producers``: convs writing the space (one → free, several → constrained, same indices dropped);
    ``consumers``: convs reading it (their input channels are removed with the pruned filters).
    """

    producers: list[str]
    consumers: list[str]
    channels: int

    @property
    def key(self) -> str:
        return self.producers[0]

    @property
    def constrained(self) -> bool:
        return len(self.producers) > 1


@dataclass
class ChannelStructure:
    """Result of :func:`analyze_channels`: prunable groups (graph order) and the convs left alone."""

    groups: list[ChannelGroup]
    fixed: list[str] = field(default_factory=list)

    @property
    def free(self) -> list[ChannelGroup]:
        return [group for group in self.groups if not group.constrained]

    @property
    def constrained(self) -> list[ChannelGroup]:
        return [group for group in self.groups if group.constrained]

    def group(self, key: str) -> ChannelGroup:
        for group in self.groups:
            if group.key == key:
                return group
        raise KeyError(key)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every ``nn.Conv2d`` (also :class:`WNConv2d`) a single node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


_SAME_SPACE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                       nn.Identity, nn.Dropout, nn.Hardtanh, nn.Upsample)
_SAME_SPACE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.elu,
                         torch.clamp, torch.clip, operator.neg, torch.neg, F.dropout, F.interpolate,
                         F.hardtanh, F.relu6}
_SAME_SPACE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "neg", "contiguous", "clone", "float",
                       "clamp_", "relu_", "to", "detach"}
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                          operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}


class _SpaceUnion:
    """Union-find over channel spaces; space 0 is "fixed" (never prunable)."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, first: int, second: int) -> int:
        root_a, root_b = self.find(first), self.find(second)
        if root_a == root_b:
            return root_a
        low, high = min(root_a, root_b), max(root_a, root_b)
        self.parent[high] = low
        return low

    def fix(self, space: int) -> None:
        self.union(space, 0)


def analyze_channels(network: nn.Module, skip_layers: Sequence[str] = ()) -> ChannelStructure:
    """Finds ASSL's free and constrained layers of an EDSR-like network by tracing it with ``torch.fx``.

    Channel spaces flow through channel-wise ops (activations, scalar maths, interpolation); tensor
    additions/multiplications merge spaces. A space touching the input, the output, a buffer/parameter
    (e.g. a mean shift), a ``PixelShuffle`` or any op not understood here is fixed, so its producers are
    not pruned. ``skip_layers`` are ``fnmatch`` patterns of convs never pruned (their input channels still
    follow the upstream group).
    """
    graph = _ConvLeafTracer().trace(network)
    modules = dict(network.named_modules())
    spaces = _SpaceUnion()
    node_space: dict[torch.fx.Node, int] = {}
    conv_output: dict[str, int] = {}
    conv_input: dict[str, int] = {}
    order: list[str] = []

    def tensor_spaces(args: Any) -> list[int]:
        found: list[int] = []
        torch.fx.node.map_arg(args, lambda n: found.append(node_space[n]) if n in node_space else None)
        return found

    def merged(args: Any) -> int | None:
        found = tensor_spaces(args)
        if not found:
            return None
        root = found[0]
        for other in found[1:]:
            root = spaces.union(root, other)
        return root

    def opaque(node: torch.fx.Node) -> int:
        for space in tensor_spaces((node.args, node.kwargs)):
            spaces.fix(space)
        return 0

    for node in graph.nodes:
        result: int | None
        if node.op in ("placeholder", "get_attr"):
            result = 0
        elif node.op == "output":
            opaque(node)
            continue
        elif node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d):
                name = str(node.target)
                input_space = merged(node.args[:1])
                prunable = (module.groups == 1 and module.weight.requires_grad
                            and not any(fnmatch.fnmatch(name, pattern) for pattern in skip_layers))
                if module.groups != 1 and input_space is not None:
                    spaces.fix(input_space)
                result = spaces.new()
                if not prunable:
                    spaces.fix(result)
                conv_output[name] = result
                conv_input[name] = input_space if input_space is not None else 0
                order.append(name)
            elif isinstance(module, _SAME_SPACE_MODULES) or (
                    isinstance(module, nn.PReLU) and module.num_parameters == 1):
                result = merged(node.args[:1])
            else:
                result = opaque(node)
        elif node.op == "call_function" and node.target in _SAME_SPACE_FUNCTIONS:
            result = merged(node.args[:1])
        elif node.op == "call_method" and node.target in _SAME_SPACE_METHODS:
            result = merged(node.args[:1])
        elif (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
                node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
            result = merged((node.args, node.kwargs))
        elif node.op == "call_function" and node.target is getattr:
            result = None
        else:
            result = opaque(node)
        if result is not None:
            node_space[node] = result

    groups: dict[int, ChannelGroup] = {}
    fixed: list[str] = []
    for name in order:
        root = spaces.find(conv_output[name])
        if root == 0:
            fixed.append(name)
            continue
        module = modules[name]
        group = groups.setdefault(root, ChannelGroup([], [], module.out_channels))
        group.producers.append(name)
    for name in order:
        root = spaces.find(conv_input[name])
        if root in groups:
            groups[root].consumers.append(name)
    return ChannelStructure(list(groups.values()), fixed)

