"""``effsr profile``: cost and measured speed/memory of a network as it will be deployed.

:func:`profile_network` returns a JSON-serialisable dict; :func:`format_profile_table` renders it.
The CLI (``effsr profile --config X.yaml [--ckpt_path C] [--json]``, :func:`profile_main`) passes the method module's
``deployed_network()`` (compact, sparse or routed), so whatever that network executes is what is counted
and timed.

How each number is obtained:

- ``params``: :func:`effsr.cost.count_params` of the network.
- ``macs_720p`` / ``macs_per_lr_patch_32`` / ``flops_classsr``: :mod:`effsr.cost` (FlopCounterMode; units in
  its docstring). Counted on a meta-device copy when the network allows it (shapes only, instant), otherwise
  by running it on its device.
- ``macs_at_lr_size``: MACs of one forward on the profiled ``lr_size`` input, the random image that is timed
  (relates latency to work).
- A network whose cost is not that of one forward on a zero image (e.g. routing, where the cost is defined at
  given class proportions) defines ``profile_costs(scale) -> dict`` (:class:`OwnProfileCosts`): its entries
  (``macs_720p`` and ``macs_per_lr_patch_32`` at least, plus any extra, JSON-serialisable keys) replace the
  counted ones; ``macs_at_lr_size`` is still counted.
- ``latency_ms_median``: median wall-clock time of ``runs`` forwards (after ``warmup`` untimed ones) on one
  random LR image of ``lr_size``, batch 1, ``torch.inference_mode``; on CUDA each run is synchronised.
  ``device`` and ``torch_threads`` (intra-op threads) are reported with it.
- ``peak_memory_mib``: memory the forward needs beyond what was resident before it (weights and the input
  are already allocated). CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before, after
  ``reset_peak_memory_stats``. CPU (Linux): growth of the process's peak resident set size; the peak
  (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs`` and freed heap memory is returned to the
  OS (``malloc_trim``) first, so the number is the forward's own peak. Where ``clear_refs`` is not available,
  the growth of ``getrusage`` ``ru_maxrss`` is reported instead — a lower bound (0 if the process already
  peaked higher earlier). ``memory_method`` says which was used.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from effsr.cost import count_macs, count_params, format_count, lr_size_for_720p, macs_at_720p, macs_per_lr_patch

__all__ = ["OwnProfileCosts", "format_profile_table", "profile_network", "time_runs_ms"]

_MIB = 1024 * 1024
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@runtime_checkable
class OwnProfileCosts(Protocol):
    """A network whose cost is not one forward on a zero image (e.g. routing at given class proportions)."""

    def profile_costs(self, scale: int) -> dict[str, Any]: ...


def _profile_input(lr_size: tuple[int, int]) -> Tensor:
    """The random LR image that is timed (and counted by ``macs_at_lr_size``)."""
    return torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(0))


def _count_costs(network: nn.Module, scale: int, lr_size: tuple[int, int]) -> dict[str, Any]:
    """MACs at 720p, per 32×32 LR patch (or the network's ``profile_costs``) and for the profiled input: on a
    meta copy when possible (shapes only), else on the real network (data-dependent layers cannot run on meta)."""
    own_costs = network.profile_costs if isinstance(network, OwnProfileCosts) else None

    def count(model: nn.Module, device: torch.device) -> dict[str, Any]:
        costs: dict[str, Any] = {} if own_costs is not None else {
            "macs_720p": macs_at_720p(model, scale, device=device),
            "macs_per_lr_patch_32": macs_per_lr_patch(model, scale, 32, device=device)}
        return {**costs, "macs_at_lr_size": count_macs(model, _profile_input(lr_size).to(device))}

    try:
        counted = count(copy.deepcopy(network).to("meta"), torch.device("meta"))
    except Exception:  # noqa: BLE001 - any failure on meta falls back to counting the real forward
        counted = count(network, next((p.device for p in network.parameters()), torch.device("cpu")))
    return {**own_costs(scale), **counted} if own_costs is not None else counted


def time_runs_ms(run: Callable[[], object], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time [ms] of each of ``runs`` calls of ``run()`` after ``warmup`` untimed ones; on CUDA every timed
    call is synchronised (the one timing loop of ``effsr profile`` and ``effsr compare``)."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run()
    synchronize()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        synchronize()
        timings.append((time.perf_counter() - start) * 1000.0)
    return timings


def _status_kib(field: str) -> int:
    """A ``VmXXX`` field of /proc/self/status in KiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    """Collects garbage and, with glibc, returns freed heap pages to the OS so RSS reflects live memory."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _cpu_peak_memory(run: Callable[[], object]) -> tuple[int, str]:
    """(bytes, method) of the peak RSS growth during ``run()`` on CPU."""
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
        run()
        return max(0, _status_kib("VmHWM") - before) * 1024, "cpu: peak RSS growth (VmHWM reset via clear_refs)"
    except OSError:
        unit = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) * unit, "cpu: ru_maxrss growth (lower bound)"


def _cuda_peak_memory(run: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(bytes, method) of the peak allocated CUDA memory beyond what was allocated before ``run()``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "cuda: max_memory_allocated growth"


def _device_name(device: torch.device) -> str:
    """The device with its model name (GPU name; CPU model from /proc/cpuinfo where available)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{device} ({cpu})"


def profile_network(network: nn.Module, scale: int, lr_size: tuple[int, int] = (180, 320), runs: int = 10,
                    warmup: int = 2, device: str = "cpu") -> dict[str, Any]:
    """Params, MACs (1280×720 HR and per 32×32 LR patch), latency and peak memory of ``network``.

    Latency and memory are measured on a random ``(1, 3, *lr_size)`` input on ``device``; the network is
    moved there and put in eval mode for the measurement (its mode is restored afterwards). See the module
    docstring for how each number is measured.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    height, width = (int(size) for size in lr_size)
    target = torch.device(device)
    report: dict[str, Any] = {"network": type(network).__name__, "scale": int(scale),
                              "params": count_params(network), **_count_costs(network, scale, (height, width))}
    report["flops_classsr"] = 2 * report["macs_per_lr_patch_32"]

    was_training = network.training
    network = network.to(target).eval()
    image = _profile_input((height, width)).to(target)

    def forward() -> Tensor:
        with torch.inference_mode():
            return network(image)

    try:
        if target.type == "cuda":
            peak_bytes, memory_method = _cuda_peak_memory(forward, target)
        else:
            peak_bytes, memory_method = _cpu_peak_memory(forward)
        timings = time_runs_ms(forward, runs, warmup, target)
    finally:
        network.train(was_training)

    report.update({
        "lr_size": [height, width],
        "hr_size": [height * int(scale), width * int(scale)],
        "device": _device_name(target),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "latency_ms_median": statistics.median(timings),
        "latency_ms_min": min(timings),
        "peak_memory_mib": peak_bytes / _MIB,
        "memory_method": memory_method,
        "torch_version": torch.__version__,
    })
    return report


def _render_extra(key: str, value: Any, in_list: bool = False) -> str:
    """An extra key's value: ``macs…``/``flops…`` counts with a decimal prefix, ``…percent…`` as %, lists item
    by item (small floats to 4 digits), other large floats with thousands separators."""
    if isinstance(value, list):
        return "[" + ", ".join(_render_extra(key, item, in_list=True) for item in value) + "]"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    unit = {"macs": "MACs", "flops": "FLOPs"}.get(key.split("_", 1)[0])
    if "percent" in key:
        return f"{value:.2f} %"
    if unit is not None:
        return f"{format_count(value, unit)} ({value:,.0f})"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}" if in_list else str(value)
    return str(value)


def format_profile_table(report: dict[str, Any]) -> str:
    """A two-column text table of a :func:`profile_network` report (extra keys are listed at the end)."""
    rows: list[tuple[str, str]] = []
    known: set[str] = set()

    def add(label: str, key: str, render: Callable[[Any], str]) -> None:
        if key in report:
            rows.append((label, render(report[key])))
            known.add(key)

    size = lambda value: f"{value[1]}×{value[0]} (W×H)"  # noqa: E731
    add("network", "network", str)
    add("model", "model", str)
    add("scale", "scale", lambda value: f"×{value}")
    add("params", "params", lambda value: f"{format_count(value)} ({value:,})")
    add("MACs, 1280×720 output", "macs_720p", lambda value: f"{format_count(value, 'MACs')} ({value:,})")
    add("MACs per 32×32 LR patch", "macs_per_lr_patch_32", lambda value: format_count(value, "MACs"))
    add("ClassSR FLOPs (2×MACs) per patch", "flops_classsr", lambda value: format_count(value, "FLOPs"))
    add("LR input", "lr_size", size)
    add("HR output", "hr_size", size)
    add("MACs for this input", "macs_at_lr_size", lambda value: format_count(value, "MACs"))
    add("device", "device", str)
    add("torch threads", "torch_threads", str)
    add("latency (median)", "latency_ms_median", lambda value: (
        f"{value:.1f} ms (median of {report.get('runs', '?')} runs, min {report.get('latency_ms_min', 0.0):.1f} ms)"))
    known.update({"runs", "latency_ms_min", "warmup"})
    add("peak memory", "peak_memory_mib", lambda value: f"{value:.1f} MiB")
    add("memory measured as", "memory_method", str)
    add("torch", "torch_version", str)
    for key, value in report.items():
        if key not in known:
            rows.append((key, _render_extra(key, value)))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def profile_main(argv: list[str]) -> int:
    """``effsr profile``: the model of ``--config`` (and ``--ckpt_path``) profiled as deployed; prints the table
    (or JSON) and optionally writes the JSON report."""
    from effsr.cli import load_module_from_config  # the CLI's parser builds the model (effsr.cli imports this late)

    parser = argparse.ArgumentParser(
        prog="effsr profile",
        description="Params, MACs at 1280×720 HR, MACs per 32×32 LR patch, latency and peak memory of the "
        "model as it will be deployed (compact / sparse / routed).",
    )
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
    parser.add_argument("--ckpt_path", default=None, help="checkpoint to profile (pruned/sparse structure included)")
    parser.add_argument("--lr_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="LR input size for latency/memory (default: the 1280×720-HR input for the scale)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    args, overrides = parser.parse_known_args(argv)
    config_args = [item for config in args.config for item in ("--config", config)] + overrides
    model = load_module_from_config(config_args, args.ckpt_path)
    lr_size = tuple(args.lr_size) if args.lr_size else lr_size_for_720p(model.scale)
    report = profile_network(model.deployed_network(), model.scale, lr_size=lr_size, runs=args.runs,
                             device=args.device)
    report.update({f"method_{key}": value for key, value in model.cost_report().items()})
    report["model"] = type(model).__name__
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str) if args.json else format_profile_table(report))
    return 0
