"""ASSL: Aligned Structured Sparsity Learning (Zhang et al., NeurIPS 2021) — specification: methods.md §1.

Pieces, all plain functions over ``nn.Module``s, then one thin LightningModule:

* :class:`WNConv2d` — weight-normalised conv, filter i = γ_i · W_i / ‖W_i‖, γ initialised to ‖W_i‖ so
  converting a dense network (:func:`convert_to_weight_norm`) leaves its output unchanged.
* :func:`analyze_channels` — traces the network (``torch.fx``) and groups convs whose output channels are
  tied by residual additions: a group with one producer is *free*, with several *constrained*; convs
  feeding ``PixelShuffle``/the output are never pruned, convs reading a group lose input channels.
* :func:`ssa_loss` (sparsity-structure alignment), :class:`GrowingL2` (growing penalty on pruned filters).
* :func:`compute_plan` — local ratio, ``min(ceil(ratio·N), N−1)`` pruned, optional keep-count rounding.
* :func:`prune_network` — folds γ and physically removes filters → a plain network with fewer channels;
  :func:`deploy_network` folds res_scale/mean shift and fuses conv+ReLU / conv+residual for CPU inference
  (what :meth:`ASSLModule.infer` runs, cached);
  :func:`apply_shapes` rebuilds that structure from a checkpoint's plan before its state dict is loaded.
* :class:`ASSLModule` — phases ``dense`` / ``ssa`` / ``regularize`` / ``stabilize`` / ``prune`` / ``finetune``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from effsr.errors import CheckpointError, ConfigError
from effsr.models.base import SRModule, _default_optimizer

Ranking = Literal["first", "sum"]


# ============================================================================ weight normalisation
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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert_to_weight_norm(network: nn.Module, names: Iterable[str]) -> None:
    """Replaces the named ``nn.Conv2d``s of ``network`` in place by :class:`WNConv2d` (output unchanged)."""
    for name in names:
        conv = network.get_submodule(name)
        if not isinstance(conv, WNConv2d):
            _set_submodule(network, name, WNConv2d.from_conv(conv))


def fold_weight_norm(network: nn.Module) -> None:
    """Replaces every :class:`WNConv2d` of ``network`` in place by a plain conv with γ folded in."""
    for name, module in list(network.named_modules()):
        if isinstance(module, WNConv2d):
            _set_submodule(network, name, module.to_conv())


def filter_scales(conv: nn.Conv2d) -> Tensor:
    """Per-filter importance: |γ| of a WN conv, ‖W_i‖₂ of a plain conv (detached)."""
    if isinstance(conv, WNConv2d):
        return conv.gamma.detach().abs()
    return conv.weight.detach().flatten(1).norm(dim=1)


# ============================================================================ channel analysis
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


# ============================================================================ pruning plan
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


def group_importance(network: nn.Module, group: ChannelGroup, ranking: Ranking = "first") -> Tensor:
    """Importance of a group's channels: its first producer's |γ| (paper) or the sum over producers."""
    if ranking == "first" or not group.constrained:
        return filter_scales(network.get_submodule(group.producers[0]))
    if ranking == "sum":
        return torch.stack([filter_scales(network.get_submodule(name)) for name in group.producers]).sum(dim=0)
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


# ============================================================================ physical pruning
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
        _set_submodule(compact, name, smaller)
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
        _set_submodule(network, name, nn.Conv2d(
            int(in_channels), int(out_channels), conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, device=conv.weight.device,
            dtype=conv.weight.dtype))


# ============================================================================ deployment
class FusedConv2d(nn.Module):
    """Inference-only conv with a fused ReLU or residual add: one oneDNN call on CPU (float32, no autograd).

    ``forward(x)`` = conv(x) (+ ReLU when ``relu``); ``forward(x, other)`` = conv(x) + other. Elsewhere (GPU,
    other dtypes, autograd) it computes the same with plain PyTorch ops.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        self.out_channels = conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def _onednn(self, x: Tensor, other: Tensor | None) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (other is not None and other.requires_grad)):
            return False
        return other is None or (other.dtype == x.dtype and tuple(other.shape) == self._output_shape(x))

    def _output_shape(self, x: Tensor) -> tuple[int, ...]:
        kernel = self.weight.shape[2:]
        spatial = ((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size, pad, dilation, k, stride
                   in zip(x.shape[2:], self.padding, self.dilation, kernel, self.stride, strict=True))
        return (x.shape[0], self.out_channels, *spatial)

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if self._onednn(x, other):
            x = x.contiguous(memory_format=torch.channels_last)
            if other is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, *geometry, "relu" if self.relu else "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other.contiguous(memory_format=torch.channels_last), self.weight, self.bias, *geometry,
                "add", None, None, [], None)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if other is not None:
            return out + other
        return F.relu(out) if self.relu else out


_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD_FUNCTIONS = {operator.add, torch.add}


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _materialise_weights(network: nn.Module) -> None:
    """Replaces computed weights of a (copied, eval-mode) network by plain ones, in place.

    :class:`WNConv2d` → ``nn.Conv2d`` with γ folded; ``torch.nn.utils.parametrize`` parametrisations (e.g.
    ``parametrizations.weight_norm``) → a parameter holding their current value; old-style
    ``torch.nn.utils.weight_norm`` hooks removed. Each takes the value the next forward would have used.
    Not ``parametrize.remove_parametrizations``: a deep copy shares the injected ``Parametrized*`` class with
    the original, and removing the parametrisation deletes the property from that class, i.e. breaks the
    original network too; here only the copy's ``__class__`` is reset.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

    fold_weight_norm(network)
    with torch.no_grad():
        for module in list(network.modules()):
            if parametrize.is_parametrized(module):
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
                module.__class__ = module.__class__.__bases__[0]
                del module._modules["parametrizations"]
                for name, value in values.items():
                    module.register_parameter(name, nn.Parameter(value, requires_grad=False))
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, WeightNorm):
                    remove_weight_norm(module, hook.name)


def _computed_weights_memo(network: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo standing in detached aliases for old-style weight-norm ``weight`` attributes: they
    are autograd results (not deep-copyable) and :func:`_materialise_weights` recomputes them anyway."""
    from torch.nn.utils.weight_norm import WeightNorm

    memo: dict[int, Any] = {}
    for module in network.modules():
        for hook in module._forward_pre_hooks.values():
            value = getattr(module, hook.name, None) if isinstance(hook, WeightNorm) else None
            if isinstance(value, Tensor):
                memo[id(value)] = value.detach()
    return memo


def deploy_network(network: nn.Module) -> torch.fx.GraphModule:
    """An inference-only copy of ``network`` with everything foldable folded (outputs equal up to float error).

    Scalar multiplies of a conv output (EDSR's ``res_scale``) and a constant per-channel add after
    ``PixelShuffle`` (the mean shift) go into that conv's weights/bias; conv → ReLU and conv + residual
    become single :class:`FusedConv2d` calls (oneDNN post-ops on CPU, channels-last). Works on the dense,
    the weight-normalised (γ folded first) and the pruned network; ops it does not recognise, convs with
    hooks and convs called more than once (shared weights) are kept as they are.
    """
    copied = copy.deepcopy(network, _computed_weights_memo(network)).eval()
    _materialise_weights(copied)
    graph_module = torch.fx.GraphModule(copied, _ConvLeafTracer().trace(copied))
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owner = str(node.target) if node.op == "call_module" else str(node.target).rpartition(".")[0]
            uses[owner] = uses.get(owner, 0) + 1

    def foldable(name: str, module: Any) -> bool:
        """A plain zero-padded conv used once, without hooks: its weights may be changed and fused."""
        return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
                and uses.get(name, 0) == 1 and not (module._forward_pre_hooks or module._forward_hooks))

    def plain_conv(node: Any) -> nn.Conv2d | None:
        if not isinstance(node, torch.fx.Node) or node.op != "call_module" or len(node.users) != 1:
            return None
        module = modules.get(str(node.target))
        return module if foldable(str(node.target), module) else None

    def replace(node: torch.fx.Node, by: torch.fx.Node) -> None:
        node.replace_all_uses_with(by)
        graph.erase_node(node)

    with torch.no_grad():
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
                first, second = node.args
                source, factor = (first, second) if isinstance(second, int | float) else (second, first)
                conv = plain_conv(source) if isinstance(factor, int | float) else None
                if conv is not None:
                    conv.weight.mul_(factor)
                    if conv.bias is not None:
                        conv.bias.mul_(factor)
                    replace(node, source)
            elif node.op == "call_function" and node.target in _ADD_FUNCTIONS and not node.kwargs:
                shuffle, shift = node.args if len(node.args) == 2 else (None, None)
                if isinstance(shuffle, torch.fx.Node) and shuffle.op == "get_attr":
                    shuffle, shift = shift, shuffle
                conv = plain_conv(shuffle)
                value = _attribute(graph_module, str(shift.target)) if isinstance(shift, torch.fx.Node) and \
                    shift.op == "get_attr" else None
                if conv is not None and conv.bias is not None and isinstance(value, Tensor) and \
                        value.shape == (1, conv.out_channels, 1, 1):
                    conv.bias.add_(value.reshape(-1))
                    replace(node, shuffle)
                    continue
                if not (isinstance(shuffle, torch.fx.Node) and isinstance(shift, torch.fx.Node)
                        and shift.op == "get_attr" and shuffle.op == "call_module" and len(shuffle.users) == 1
                        and isinstance(modules.get(str(shuffle.target)), nn.PixelShuffle)):
                    continue
                conv = plain_conv(shuffle.args[0])
                value = _attribute(graph_module, str(shift.target))
                factor = modules[str(shuffle.target)].upscale_factor ** 2
                if (conv is None or conv.bias is None or not isinstance(value, Tensor)
                        or value.shape != (1, conv.out_channels // factor, 1, 1)):
                    continue
                conv.bias.add_(value.reshape(-1).repeat_interleave(factor))
                replace(node, shuffle)
        for node in list(graph.nodes):
            is_relu = ((node.op == "call_function" and node.target in _RELU_FUNCTIONS)
                       or (node.op == "call_method" and node.target == "relu")
                       or (node.op == "call_module" and type(modules.get(str(node.target))) is nn.ReLU))
            source = node.args[0] if node.args else None
            conv = plain_conv(source) if is_relu else None
            if conv is not None:
                fused = FusedConv2d(conv, relu=True)
                _set_submodule(graph_module, str(source.target), fused)
                modules[str(source.target)] = fused
                replace(node, source)
        for node in list(graph.nodes):
            if not (node.op == "call_function" and node.target in _ADD_FUNCTIONS and len(node.args) == 2
                    and not node.kwargs):
                continue
            first, second = node.args
            source, other = (second, first) if plain_conv(second) is not None else (first, second)
            conv = plain_conv(source)
            if conv is None or not isinstance(other, torch.fx.Node):
                continue
            fused = FusedConv2d(conv)
            _set_submodule(graph_module, str(source.target), fused)
            modules[str(source.target)] = fused
            with graph.inserting_after(node):
                call = graph.call_module(str(source.target), (source.args[0], other))
            replace(node, call)
            graph.erase_node(source)
        for name, module in list(graph_module.named_modules()):
            if foldable(name, module):
                _set_submodule(graph_module, name, FusedConv2d(module))
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return graph_module.to(memory_format=torch.channels_last)


# ============================================================================ losses
def ssa_loss(gammas: Sequence[Tensor], num_pruned: int) -> Tensor:
    """Sparsity-structure alignment: −mean(S·Sᵀ) with S_l = sigmoid(|γ_l| − t_l) stacked over layers.

    ``t_l`` is layer l's pruning threshold: its ``num_pruned``-th smallest |γ| (detached). Minimising the
    loss pushes the layers' soft keep-masks to agree on which channels survive.
    """
    masks = []
    for gamma in gammas:
        magnitude = gamma.abs()
        threshold = magnitude.detach().kthvalue(num_pruned).values if num_pruned > 0 else magnitude.detach().min()
        masks.append(torch.sigmoid(magnitude - threshold))
    stacked = torch.stack(masks)
    return -(stacked @ stacked.t()).mean()


@dataclass
class GrowingL2:
    """ASSL's growing L2 coefficient: +``step`` every ``interval`` steps from a layer's start, up to ``limit``.

    α(s) = min(limit, step · ⌊(s − start + 1) / interval⌋) for optimizer step s (0-based, so the
    ``interval``-th step of a layer already applies ``step``); after :meth:`freeze` at step f it stays α(f).
    """

    interval: int = 20
    step: float = 1e-4
    limit: float = 0.5
    starts: dict[str, int] = field(default_factory=dict)
    frozen_at: int | None = None

    def start(self, key: str, global_step: int) -> None:
        self.starts.setdefault(key, global_step)

    def freeze(self, global_step: int) -> None:
        if self.frozen_at is None:
            self.frozen_at = global_step

    def alpha(self, key: str, global_step: int) -> float:
        if key not in self.starts:
            return 0.0
        step = global_step if self.frozen_at is None else min(global_step, self.frozen_at)
        increments = max(0, step - self.starts[key] + 1) // max(1, self.interval)
        return min(self.limit, self.step * increments)

    def reached(self, keys: Iterable[str], global_step: int) -> bool:
        keys = list(keys)
        return bool(keys) and all(self.alpha(key, global_step) >= self.limit - 1e-12 for key in keys)

    def state(self) -> dict[str, Any]:
        return {"starts": dict(self.starts), "frozen_at": self.frozen_at}

    def load(self, state: dict[str, Any]) -> None:
        self.starts = {str(key): int(value) for key, value in (state.get("starts") or {}).items()}
        self.frozen_at = state.get("frozen_at")


# ============================================================================ LightningModule
@dataclass
class _DeployCache:
    """:meth:`ASSLModule.infer`'s fused copy and what it was built from (see ``ASSLModule._fused_network``)."""

    key: tuple[Any, ...]
    fingerprint: Tensor
    network: nn.Module
    held: tuple[Any, ...]


def _fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor sums (on the CPU, one transfer per device): catch in-place updates that do not bump
    ``_version`` (fused optimizers)."""
    sums: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        tensor = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        dtype = torch.float32 if tensor.device.type == "mps" else torch.float64  # MPS has no float64
        sums.setdefault(tensor.device, []).append(tensor.detach().sum(dtype=dtype))
    return torch.cat([torch.stack(values).cpu().double() for values in sums.values()]) if sums else \
        torch.zeros(0, dtype=torch.float64)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


PHASES = ("dense", "ssa", "regularize", "stabilize", "prune", "finetune")


class ASSLModule(SRModule):
    """ASSL pipeline on any EDSR-like network (LEDSR in the paper); phases are driven by ``PhaseSchedule``.

    Phases (names in the YAML): ``dense`` (optional plain L1; ``until: dense_ready`` ends it at once when a
    ``dense_checkpoint`` was loaded), ``ssa`` (WN conversion, L1 + SSA on constrained layers, growing L2 on
    free layers), ``regularize`` (constrained pruned set fixed; growing L2 everywhere; ``until:
    reg_limit_reached``), ``stabilize`` (α held), ``prune`` (fold γ, remove channels; 0 steps is fine),
    ``finetune`` (plain L1 on the compact network; prunes first if no ``prune`` phase ran).

    Args:
        network: the dense backbone (e.g. ``effsr.archs.LEDSR``).
        prune_ratio: local fraction of filters pruned per layer (paper: 0.80859375 = keep 49 of 256).
        keep: absolute kept filters per layer; overrides ``prune_ratio``.
        keep_multiple_of: round kept counts to a multiple (8/16) for hardware-friendly widths.
        constrained_ranking: ``first`` (paper: rank the constrained set by the first constrained layer's |γ|)
            or ``sum`` (sum of |γ| over all constrained layers).
        skip_layers: ``fnmatch`` patterns of convs never pruned.
        ssa_weight: weight of the SSA loss.
        reg_interval / reg_step / reg_limit: growing-L2 schedule (paper 20 / 1e-4 / 0.5).
        reg_bias: also penalise the pruned filters' biases (½·α·(γ² + b²)).
        free_reg_in_ssa: free layers start their growing L2 with the ``ssa`` phase (else with ``regularize``).
        dense_checkpoint: optional dense weights to start from (Lightning checkpoint or plain state dict).
        fused_inference: validation/test/predict run :func:`deploy_network`'s fused copy (cached, rebuilt when
            a weight changes) instead of the plain network; false runs the plain network.
        **kwargs: :class:`effsr.models.SRModule` options (tiling, image logging, results_dir).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        prune_ratio: float = 0.80859375,
        keep: int | None = None,
        keep_multiple_of: int | None = None,
        constrained_ranking: Ranking = "first",
        skip_layers: list[str] | None = None,
        ssa_weight: float = 1.0,
        reg_interval: int = 20,
        reg_step: float = 1e-4,
        reg_limit: float = 0.5,
        reg_bias: bool = True,
        free_reg_in_ssa: bool = True,
        dense_checkpoint: str | None = None,
        fused_inference: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        if constrained_ranking not in ("first", "sum"):
            raise ConfigError(f"constrained_ranking must be 'first' or 'sum', got {constrained_ranking!r}")
        num_kept(8, prune_ratio if keep is None else None, keep, None)
        self.prune_ratio = prune_ratio
        self.keep = keep
        self.keep_multiple_of = keep_multiple_of
        self.constrained_ranking: Ranking = constrained_ranking
        self.skip_layers = list(skip_layers or [])
        self.ssa_weight = ssa_weight
        self.reg_bias = reg_bias
        self.free_reg_in_ssa = free_reg_in_ssa
        self.growth = GrowingL2(reg_interval, reg_step, reg_limit)
        self.dense_checkpoint = dense_checkpoint
        self.stage: Literal["dense", "wn", "compact"] = "dense"
        self.plan: dict[str, list[int]] = {}
        self.producers: dict[str, list[str]] = {}
        self._structure: ChannelStructure | None = None
        self.fused_inference = fused_inference
        self._deploy_cache: _DeployCache | None = None
        if dense_checkpoint:
            load_dense_weights(self.network, dense_checkpoint)

    # ------------------------------------------------------------------ structure
    @property
    def structure(self) -> ChannelStructure:
        """Free/constrained groups of the (dense or WN) network; traced once."""
        if self._structure is None:
            if self.stage == "compact":
                raise ConfigError("the network is already pruned; its channel structure is final")
            self._structure = analyze_channels(self.network, self.skip_layers)
            if not self._structure.groups:
                raise ConfigError(f"ASSL found no prunable conv in {type(self.network).__name__}")
        return self._structure

    def _kept_count(self, group: ChannelGroup) -> int:
        ratio = None if self.keep is not None else self.prune_ratio
        return num_kept(group.channels, ratio, self.keep, self.keep_multiple_of)

    def _select(self, groups: Iterable[ChannelGroup]) -> None:
        """Fixes the kept set of groups that have none yet (ranked by |γ| now)."""
        pending = [group for group in groups if group.key not in self.plan]
        for group in pending:
            importance = group_importance(self.network, group, self.constrained_ranking)
            self.plan[group.key] = top_indices(importance, self._kept_count(group))
            self.producers[group.key] = list(group.producers)
        if pending:
            self._log_widths("assl/planned_widths")

    def _to_weight_norm(self) -> bool:
        if self.stage != "dense":
            return False
        names = [name for group in self.structure.groups for name in group.producers]
        convert_to_weight_norm(self.network, names)
        self.stage = "wn"
        return True

    def _prune(self) -> bool:
        if self.stage == "compact":
            return False
        self._to_weight_norm()
        self._select(self.structure.groups)
        self.network = prune_network(self.network, self.structure, self.plan)
        self.stage = "compact"
        self._cost_cache = None
        self._deploy_cache = None
        self._log_widths("assl/kept_widths")
        return True

    def inference_network(self) -> torch.fx.GraphModule:
        """The current network for fast CPU inference: :func:`deploy_network` (folded, oneDNN-fused).

        Not :meth:`deployed_network`, which cost counting and ``effsr profile`` use (plain convs, counted params).
        """
        return deploy_network(self.network)

    def infer(self, lr: Tensor) -> Tensor:
        """Validation/test/predict: the cached :func:`deploy_network` copy when it may be used, else the network.

        The fused copy runs only when nothing can tell the difference: every module in eval mode, autograd
        off (``no_grad``/``inference_mode``: its weights are detached buffers) and no autocast (oneDNN calls
        are not autocast ops). It equals the network up to float rounding in every stage (γ folded first).
        """
        deployed = self._fused_network(lr) if self.fused_inference else None
        if deployed is None:
            return self.network(lr)
        return deployed(lr).contiguous()

    def _fused_network(self, lr: Tensor) -> nn.Module | None:
        if torch.is_grad_enabled() or _autocast_enabled(lr.device.type):
            return None
        modules = list(self.network.modules())
        if any(module.training for module in modules):
            return None
        tensors = [*self.network.parameters(), *self.network.buffers()]
        if any(tensor.is_inference() or tensor.is_meta for tensor in tensors):
            return None
        key = (tuple(map(id, modules)),
               tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in tensors))
        cache = self._deploy_cache
        if cache is not None and cache.key == key and torch.equal(cache.fingerprint, _fingerprint(tensors)):
            return cache.network
        self._deploy_cache = None
        with torch.inference_mode(False), torch.no_grad():
            network = deploy_network(self.network)
            # modules/tensors are held so their ids cannot be reused while the key is compared against them
            self._deploy_cache = _DeployCache(key, _fingerprint(tensors), network, (modules, tensors))
        return network

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The optimizer step changed the weights (fused optimizers do not bump ``_version``): drop the copy."""
        self._deploy_cache = None

    def kept_widths(self) -> dict[str, int]:
        """Kept output channels per prunable conv, in graph order (planned before pruning)."""
        widths = {name: len(self.plan[key]) for key, names in self.producers.items() for name in names}
        return {name: widths[name] for name in conv_shapes(self.network) if name in widths}

    # ------------------------------------------------------------------ SRModule hooks
    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        if name not in PHASES:
            raise ConfigError(f"ASSLModule has no phase '{name}'; use {', '.join(PHASES)}")
        changed = super().on_phase_start(name, settings)
        self._deploy_cache = None
        step = self.global_step
        if name == "dense":
            if self.stage != "dense":
                raise ConfigError("the 'dense' phase must come before ssa/regularize/prune")
            return changed
        if name in ("ssa", "regularize", "stabilize"):
            if self.stage == "compact":
                raise ConfigError(f"phase '{name}' after pruning: order the phases ssa → regularize → prune")
            changed = self._to_weight_norm() or changed
            if name == "ssa":
                self._select(self.structure.free)
                if self.free_reg_in_ssa:
                    for group in self.structure.free:
                        self.growth.start(group.key, step)
            else:
                self._select(self.structure.groups)
                for group in self.structure.groups:
                    self.growth.start(group.key, step)
            if name == "stabilize":
                self.growth.freeze(step)
            return changed
        return self._prune() or changed

    def phase_condition(self, name: str) -> bool:
        """``dense_ready``: a dense checkpoint was given; ``reg_limit_reached``: every α reached its limit."""
        if name == "dense_ready":
            return self.dense_checkpoint is not None
        if name == "reg_limit_reached":
            if self.stage != "wn":
                return False
            return self.growth.reached([group.key for group in self.structure.groups], self.global_step)
        return super().phase_condition(name)

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = F.l1_loss(self.network(lr), hr)
        logs: dict[str, Tensor] = {"l1": l1.detach()}
        loss = l1
        if self.stage == "wn":
            if self.phase_name == "ssa" and self.ssa_weight:
                alignment = self._ssa_term()
                loss = loss + self.ssa_weight * alignment
                logs["ssa"] = alignment.detach()
            penalty, alpha = self._reg_term()
            loss = loss + penalty
            logs["reg_penalty"] = penalty.detach()
            logs["reg_alpha"] = torch.tensor(alpha)
        return loss, logs

    def _ssa_term(self) -> Tensor:
        terms = []
        for group in self.structure.constrained:
            gammas = [self.network.get_submodule(name).gamma for name in group.producers]
            terms.append(ssa_loss(gammas, group.channels - self._kept_count(group)))
        if not terms:
            return torch.zeros((), device=self.device)
        return torch.stack(terms).mean()

    def _reg_term(self) -> tuple[Tensor, float]:
        """½·α·Σ(γ² + b²) over pruned filters, and the largest current α (logged)."""
        penalty = torch.zeros((), device=self.device)
        largest = 0.0
        for group in self.structure.groups:
            alpha = self.growth.alpha(group.key, self.global_step)
            largest = max(largest, alpha)
            if alpha == 0.0 or group.key not in self.plan:
                continue
            pruned = torch.tensor(pruned_indices(group.channels, self.plan[group.key]), device=self.device,
                                  dtype=torch.long)
            for name in group.producers:
                conv = self.network.get_submodule(name)
                penalty = penalty + 0.5 * alpha * conv.gamma[pruned].square().sum()
                if self.reg_bias and conv.bias is not None:
                    penalty = penalty + 0.5 * alpha * conv.bias[pruned].square().sum()
        return penalty, largest

    def structure_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stage": self.stage, "plan": {k: list(v) for k, v in self.plan.items()},
                                 "producers": {k: list(v) for k, v in self.producers.items()},
                                 "growth": self.growth.state()}
        if self.stage == "compact":
            state["shapes"] = conv_shapes(self.network)
        return state

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        if not state:
            return
        stage = state.get("stage", "dense")
        self.plan = {str(key): [int(i) for i in value] for key, value in (state.get("plan") or {}).items()}
        self.producers = {str(key): list(value) for key, value in (state.get("producers") or {}).items()}
        self.growth.load(state.get("growth") or {})
        if stage == "wn":
            self._to_weight_norm()
        elif stage == "compact":
            if self.stage != "compact":
                apply_shapes(self.network, state["shapes"])
                self._structure = None
                self.stage = "compact"
        elif stage != "dense":
            raise CheckpointError(f"unknown ASSL stage {stage!r} in the checkpoint")
        self._cost_cache = None
        self._deploy_cache = None

    def cost_report(self) -> dict[str, float]:
        """Cost of the deployed network; before pruning also the cost the current plan will give."""
        report = super().cost_report()
        if self.stage == "wn" and len(self.plan) == len(self.structure.groups):
            from effsr.cost import count_params, macs_at_720p

            compact = prune_network(self.network, self.structure, self.plan).to("meta")
            report["planned_params"] = float(count_params(compact))
            report["planned_macs_720p"] = float(macs_at_720p(compact, self.scale, device="meta"))
        return report

    # ------------------------------------------------------------------ logging
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking or self.stage != "wn":
            return
        self._log_gamma_histograms()

    def _log_gamma_histograms(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        values: dict[str, Tensor] = {}
        for kind, groups in (("constrained", self.structure.constrained), ("free", self.structure.free)):
            gammas = [self.network.get_submodule(name).gamma.detach().abs().float().cpu()
                      for group in groups for name in group.producers]
            if gammas:
                values[f"assl/gamma_{kind}"] = torch.cat(gammas)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({**{key: wandb.Histogram(value.numpy()) for key, value in values.items()},
                                       "trainer/global_step": self.global_step})
            elif isinstance(logger, TensorBoardLogger):
                for key, value in values.items():
                    logger.experiment.add_histogram(key, value, global_step=self.global_step)

    def _log_widths(self, key: str) -> None:
        """Per-layer kept widths: a bar chart in W&B, summary scalars for every logger."""
        if self._trainer is None:
            return
        widths = self.kept_widths()
        if not widths:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(data=[[name, width] for name, width in widths.items()],
                                    columns=["layer", "kept"])
                logger.experiment.log({key: wandb.plot.bar(table, "layer", "kept", title=key),
                                       "trainer/global_step": self.global_step})
            logger.log_metrics({f"{key}_mean": float(sum(widths.values()) / len(widths)),
                                f"{key}_min": float(min(widths.values()))}, step=self.global_step)


def load_dense_weights(network: nn.Module, path: str) -> None:
    """Loads dense backbone weights from a Lightning checkpoint (``network.*`` keys) or a plain state dict."""
    if not Path(path).is_file():
        raise CheckpointError(f"dense_checkpoint '{path}' does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if any(key.startswith("network.") for key in state):
        state = {key[len("network."):]: value for key, value in state.items() if key.startswith("network.")}
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"dense_checkpoint '{path}' does not fit model.network: {error}") from error
