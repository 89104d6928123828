"""Cost counting: parameters and multiply-accumulates (MACs), in the units of docs/protocol.md.

Units, always named:

- ``params``: parameters the deployed module stores (``nn.Parameter`` elements; buffers such as the
  mean shift are not counted).
- ``macs_720p``: MACs for one 1280×720 HR output (LR 640×360 at ×2, 426×240 at ×3, 320×180 at ×4) — what
  SMSR/ASSL/SLS tables call "FLOPs", "Mult-Adds" or "GMACs".
- ``macs_per_lr_patch_32``: MACs for one 32×32 LR patch; ``flops_classsr`` = 2 × that, the unit of ClassSR's
  tables. effsr never uses the bare word "FLOPs" for anything else.

Counting is done by :class:`torch.utils.flop_counter.FlopCounterMode` over what actually runs (so routed
and sparse execution paths are counted as executed), with MACs = counted FLOPs / 2 for convolutions and
matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, attention). Biases, activations, additions,
pooling and interpolation are not counted (they are not in the papers' numbers either).

Convolutions count k²·C_in·C_out·H_out·W_out / groups MACs per image. **Transposed convolutions** are
counted "at the output resolution" (docs/protocol.md), i.e. also k²·C_in·C_out·H_out·W_out / groups, where
H_out = stride·H_in (+ padding terms). FlopCounterMode itself counts a transposed conv as the arithmetic
it performs, k²·C_in·C_out·H_in·W_in / groups — stride² times less. effsr overrides that formula because the
published numbers use the output-resolution convention: ClassSR's FSRCNN-O (d=56, s=12, m=4, ×4, RGB) is
468 M "FLOPs" per 32×32 patch = 2 × 233.9 M MACs, and 233.9 M is only reached with the 9×9 deconvolution
counted at 128×128 (81·56·3·128² = 222.95 M, plus 10.99 M for the LR layers); at the input resolution it
would be 24.9 M. Pass ``transposed_conv_at_output=False`` to get the performed arithmetic instead.

Hook for simulated sparse layers: a module that defines ``reported_macs(self) -> int`` (computed from its
last forward, e.g. a masked conv counting only the kept weights/positions) has whatever FlopCounterMode
counted inside it (its own convs and any children) replaced by that number, for every call of that
module. When such modules are nested, the outermost one wins.

:func:`count_macs` counts one call of a module or callable; :class:`MacCounter` counts whatever runs inside a
``with`` block (several networks, routed inference) with the same conventions and hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from math import prod
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CostReport",
    "MacCounter",
    "count_macs",
    "count_params",
    "format_count",
    "lr_size_for_720p",
    "macs_at_720p",
    "macs_per_lr_patch",
    "meta_macs",
    "meta_macs_720p",
    "HasScale",
    "ReportsMacs",
]

@runtime_checkable
class ReportsMacs(Protocol):
    """A simulated sparse layer whose MACs are what it reports for its last forward, not what ran inside it."""

    def reported_macs(self) -> int: ...


HR_720P: tuple[int, int] = (720, 1280)
"""(height, width) of the 1280×720 HR output the MAC convention refers to."""

_CONV_OPS = (
    torch.ops.aten.convolution,
    torch.ops.aten._convolution,
    torch.ops.aten.cudnn_convolution,
    torch.ops.aten.convolution_overrideable,
    torch.ops.aten._slow_conv2d_forward,
    torch.ops.aten.mkldnn_convolution,  # called directly by SMSR's sparse GEMMs (methods/smsr/block.py)
)


def _conv_flops_at_output(x_shape: list[int], w_shape: list[int], _bias: Any, _stride: Any, _padding: Any,
                          _dilation: Any, transposed: bool, *args: Any, out_shape: list[int] | None = None,
                          **kwargs: Any) -> int:
    """2 × MACs of a (transposed or not) convolution counted at its output resolution.

    The weight holds C_out·C_in/groups·k² elements for a conv and C_in·C_out/groups·k² for a transposed
    conv, so ``prod(w_shape)`` already includes the 1/groups factor in both cases.
    """
    assert out_shape is not None
    return 2 * x_shape[0] * prod(w_shape) * prod(out_shape[2:])


def count_params(module: nn.Module) -> int:
    """Number of parameter elements the module stores (shared parameters counted once)."""
    return sum(parameter.numel() for parameter in module.parameters())


@contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Puts every module of the list in eval mode and restores each one's own mode afterwards."""
    modes = [(submodule, submodule.training) for submodule in modules]
    if modules:
        modules[0].eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


class MacCounter:
    """Context manager counting the MACs of everything that runs inside it, with effsr's conventions.

    ``modules``: the ``nn.Module`` s whose ``reported_macs`` hooks apply (searched recursively); use it when
    the counted code is not a single module call, e.g. routed inference over several networks::

        with MacCounter(policy, *branches) as counter:
            output = routed_forward(...)
        counter.macs

    Counting does not change modes or grad state (:func:`count_macs` does both).
    """

    def __init__(self, *modules: nn.Module, transposed_conv_at_output: bool = True) -> None:
        mapping = {op: _conv_flops_at_output for op in _CONV_OPS} if transposed_conv_at_output else {}
        self._counter = FlopCounterMode(display=False, custom_mapping=mapping)
        self._hooked = list(dict.fromkeys(
            submodule for module in modules for submodule in module.modules() if isinstance(submodule, ReportsMacs)
        ))
        self._handles: list[Any] = []
        self._replaced_flops = 0
        self._reported_macs = 0
        self._depth = 0
        self._start_flops = 0

    def _before(self, hooked: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._start_flops = self._counter.get_total_flops()
        self._depth += 1

    def _after(self, hooked: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._replaced_flops += self._counter.get_total_flops() - self._start_flops
            self._reported_macs += int(hooked.reported_macs())

    def __enter__(self) -> MacCounter:
        for module in self._hooked:
            self._handles.append(module.register_forward_pre_hook(self._before))
            self._handles.append(module.register_forward_hook(self._after))
        self._counter.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._counter.__exit__(*exc_info)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    @property
    def macs(self) -> int:
        """MACs counted so far: FlopCounterMode's FLOPs / 2 outside hooked modules + their reported MACs."""
        return (self._counter.get_total_flops() - self._replaced_flops) // 2 + self._reported_macs


def count_macs(module: nn.Module | Callable[..., Any], *inputs: Any, transposed_conv_at_output: bool = True,
               **kwargs: Any) -> int:
    """MACs of one ``module(*inputs, **kwargs)`` call, in eval mode under ``torch.no_grad()``.

    ``module`` may also be any callable (e.g. a routed inference function); only ``nn.Module`` s are put in
    eval mode and searched for ``reported_macs`` hooks (for several modules use :class:`MacCounter`).

    The module's (and each submodule's) train/eval mode is restored afterwards. Modules defining
    ``reported_macs()`` replace what was counted inside them by the number they report (module docstring).
    Works on the meta device for dense networks (shapes only), except where a ``reported_macs`` needs data.
    """
    modules = list(module.modules()) if isinstance(module, nn.Module) else []
    counter = MacCounter(*modules[:1], transposed_conv_at_output=transposed_conv_at_output)
    with _eval_mode(modules), torch.no_grad(), counter:
        module(*inputs, **kwargs)
    return counter.macs


def lr_size_for_720p(scale: int) -> tuple[int, int]:
    """(height, width) of the LR input whose ×scale output is the 1280×720 HR image of the convention:
    (360, 640) at ×2, (240, 426) at ×3, (180, 320) at ×4 (floor division, as the papers do)."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return HR_720P[0] // int(scale), HR_720P[1] // int(scale)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@runtime_checkable
class HasScale(Protocol):
    """An SR network that states its upscaling factor (every effsr backbone)."""

    scale: int


def _resolve_scale(module: nn.Module, scale: int | None) -> int:
    module_scale = module.scale if isinstance(module, HasScale) else None
    if scale is None:
        if module_scale is None:
            raise ValueError("pass scale= for a module without a .scale attribute")
        return int(module_scale)
    if module_scale is not None and int(module_scale) != int(scale):
        raise ValueError(f"scale={scale} but the module upsamples by ×{module_scale}")
    return int(scale)


def macs_at_720p(module: nn.Module, scale: int | None = None, device: str | torch.device | None = None,
                 channels: int = 3, transposed_conv_at_output: bool = True) -> int:
    """MACs for one 1280×720 HR output: the module run once on a zero LR image of :func:`lr_size_for_720p`.

    ``scale`` defaults to ``module.scale``; ``device`` to the module's (``"meta"`` counts shapes only).
    """
    height, width = lr_size_for_720p(_resolve_scale(module, scale))
    image = torch.zeros(1, channels, height, width, device=device or _module_device(module))
    return count_macs(module, image, transposed_conv_at_output=transposed_conv_at_output)


def macs_per_lr_patch(module: nn.Module, scale: int | None = None, patch_size: int = 32,
                      device: str | torch.device | None = None, channels: int = 3,
                      transposed_conv_at_output: bool = True) -> int:
    """MACs for one ``patch_size``×``patch_size`` LR patch (ClassSR's unit is 2 × this at 32×32).

    ``scale`` is only checked against ``module.scale`` (guards against passing the wrong network).
    """
    if scale is not None:
        _resolve_scale(module, scale)
    image = torch.zeros(1, channels, patch_size, patch_size, device=device or _module_device(module))
    return count_macs(module, image, transposed_conv_at_output=transposed_conv_at_output)


def meta_macs(module: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``module(example)`` counted on a meta-device copy (shapes only, no compute), or on the module's
    own device when a layer cannot run on meta (data-dependent execution)."""
    try:
        return count_macs(copy.deepcopy(module).to("meta"), example.to("meta"))
    except (NotImplementedError, RuntimeError):
        return count_macs(module, example.to(_module_device(module)))


def meta_macs_720p(module: nn.Module, scale: int | None = None) -> int:
    """:func:`macs_at_720p` on a meta-device copy, or on the module itself when a layer cannot run on meta."""
    try:
        return macs_at_720p(copy.deepcopy(module).to("meta"), scale, device="meta")
    except (NotImplementedError, RuntimeError):
        return macs_at_720p(module, scale)


def format_count(value: float, unit: str = "") -> str:
    """Human-readable count with a decimal prefix: ``format_count(1.5e9, "MACs") == "1.50 GMACs"``."""
    for threshold, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


@dataclass(frozen=True)
class CostReport:
    """Cost of a deployed network in named units (see the module docstring)."""

    params: int
    macs_720p: int
    macs_per_lr_patch_32: int

    @property
    def flops_classsr(self) -> int:
        """ClassSR's "FLOPs": 2 × MACs of one 32×32 LR patch."""
        return 2 * self.macs_per_lr_patch_32

    @classmethod
    def measure(cls, module: nn.Module, scale: int | None = None,
                device: str | torch.device | None = None) -> CostReport:
        """Counts params, MACs at 720p and MACs per 32×32 LR patch of ``module``."""
        return cls(
            params=count_params(module),
            macs_720p=macs_at_720p(module, scale, device=device),
            macs_per_lr_patch_32=macs_per_lr_patch(module, scale, 32, device=device),
        )

    def as_dict(self) -> dict[str, int]:
        """The fields plus ``flops_classsr``, ready for logging as ``cost/<key>``."""
        return {**asdict(self), "flops_classsr": self.flops_classsr}

    def __str__(self) -> str:
        return (f"params {format_count(self.params)}, MACs@1280×720 {format_count(self.macs_720p, 'MACs')}, "
                f"MACs per 32×32 LR patch {format_count(self.macs_per_lr_patch_32, 'MACs')} "
                f"(ClassSR FLOPs {format_count(self.flops_classsr)})")

