"""Deployment: an inference-only copy with res_scale/mean shift folded and oneDNN-fused conv+ReLU/conv+add."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.errors import ConfigError
from effsr.methods.assl.channels import _ConvLeafTracer
from effsr.methods.assl.weight_norm import fold_weight_norm

_CPU_FLOAT_LANES = {"AVX512": 16, "AVX2": 8, "SVE256": 8}


def hardware_channel_multiple(device: torch.device | str = "cpu") -> int:
    """The ``keep_multiple_of`` that gives a compact network whole vector/tensor-core tiles on ``device``.

    CPU: the float32 lanes of the widest vector ISA torch dispatches to (AVX-512: 16, AVX2 or SVE256: 8, other
    128-bit ISAs: 4); oneDNN's NHWC convs vectorise output channels, and a channel count one above a multiple
    (ASSL's 49 = 6·8 + 1) costs a whole extra vector per pixel (measured: a 49-channel 3×3 conv takes as long
    as 49 → 56 on AVX2, docs/benchmarks.md). CUDA: 8, the channel multiple tensor cores need for fp16/bf16
    convs. Both round the paper's 49 to 48.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return _CPU_FLOAT_LANES.get(torch.backends.cpu.get_cpu_capability(), 4)
    if kind == "cuda":
        return 8
    raise ConfigError(f"no documented channel multiple for device {kind!r}; set keep_multiple_of explicitly")


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
                graph_module.set_submodule(str(source.target), fused, strict=True)
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
            graph_module.set_submodule(str(source.target), fused, strict=True)
            modules[str(source.target)] = fused
            with graph.inserting_after(node):
                call = graph.call_module(str(source.target), (source.args[0], other))
            replace(node, call)
            graph.erase_node(source)
        for name, module in list(graph_module.named_modules()):
            if foldable(name, module):
                graph_module.set_submodule(name, FusedConv2d(module), strict=True)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return graph_module.to(memory_format=torch.channels_last)

@dataclass
class _DeployCache:
    """:meth:`ASSLModule.infer`'s fused copy and what it was built from (see :func:`cached_deploy`)."""

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


def cached_deploy(network: nn.Module, device_type: str,
                  cache: _DeployCache | None) -> tuple[nn.Module | None, _DeployCache | None]:
    """:func:`deploy_network`'s copy of ``network`` when nothing can tell it apart, reusing ``cache`` while the
    network is unchanged; returns (copy or None, the cache to keep). None: autograd or autocast on, a module in
    training mode, or an inference/meta tensor (the plain network must run then)."""
    if torch.is_grad_enabled() or _autocast_enabled(device_type):
        return None, cache
    modules = list(network.modules())
    if any(module.training for module in modules):
        return None, cache
    tensors = [*network.parameters(), *network.buffers()]
    if any(tensor.is_inference() or tensor.is_meta for tensor in tensors):
        return None, cache
    key = (tuple(map(id, modules)),
           tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in tensors))
    if cache is not None and cache.key == key and torch.equal(cache.fingerprint, _fingerprint(tensors)):
        return cache.network, cache
    with torch.inference_mode(False), torch.no_grad():
        deployed = deploy_network(network)
        # modules/tensors are held so their ids cannot be reused while the key is compared against them
        return deployed, _DeployCache(key, _fingerprint(tensors), deployed, (modules, tensors))
