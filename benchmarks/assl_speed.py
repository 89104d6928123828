"""Dense LEDSR (F256 R16) vs its ASSL-pruned compact model: MACs and measured CPU time.

    python benchmarks/assl_speed.py [--scales 2 4] [--lr-size 320x180] [--keep 49] [--keep-multiple-of 8]
                                    [--threads 2] [--repeats 3] [--plain | --compile] [--nchw]

The compact model is what :func:`effsr.methods.assl.prune_network` produces at the paper's ratio (keep 49
of 256 filters in every prunable layer, constrained layers aligned, the upsampler conv losing input
channels); weights are random (speed does not depend on them). Both models are timed as deployed, the same
way: :func:`effsr.methods.assl.deploy_network` (eager PyTorch; res_scale and mean shift folded, conv+ReLU and
conv+residual fused into single oneDNN calls), channels-last; ``--plain`` times the unmodified modules,
``--compile`` adds ``torch.compile`` with frozen weights (opt-in). Both run the same LR image (default
320×180, i.e. a 720p output at ×4) in inference mode with a fixed number of threads, timed in alternation
(each round: the dense model once, then the compact model about as often as fits in that time) after a
warm-up of each; medians. Besides wall time the process CPU time of every run is recorded: on a machine
shared with other jobs it is far less noisy. MACs are for a 1280×720 output (docs/protocol.md). The last
line is ``speedup=X.XX macs_ratio=Y.YY`` (wall time) of the last scale.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from effsr.archs import LEDSR
from effsr.cost import count_params, lr_size_for_720p, macs_at_720p
from effsr.methods.assl import analyze_channels, compute_plan, deploy_network, num_kept, prune_network


def compact_ledsr(dense: LEDSR, keep: int, multiple_of: int | None = None) -> nn.Module:
    """The ASSL compact model of ``dense`` keeping ``keep`` filters per prunable layer."""
    structure = analyze_channels(dense)
    plan = compute_plan(dense, structure, keep=keep, multiple_of=multiple_of)
    return prune_network(dense, structure, plan)


@dataclass
class Timing:
    """Median wall and process-CPU milliseconds of one model."""

    wall_ms: float
    cpu_ms: float


def interleaved_timing(dense: nn.Module, compact: nn.Module, image: Tensor, rounds: int,
                       max_compact_runs: int = 10) -> tuple[Timing, Timing]:
    """Medians of both models' wall and CPU times, timed in alternation so both see the same machine load.

    Each round times the dense model once, then the compact model about as often as fits in the dense
    model's time (at most ``max_compact_runs``); one warm-up run of each comes first.
    """
    samples: dict[str, list[tuple[float, float]]] = {"dense": [], "compact": []}

    def timed(name: str, network: nn.Module) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        network(image)
        samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        return samples[name][-1][0]

    with torch.inference_mode():
        ratio = timed("dense", dense) / timed("compact", compact)
        samples = {"dense": [], "compact": []}
        runs = max(1, min(max_compact_runs, round(ratio)))
        for _ in range(rounds):
            timed("dense", dense)
            for _ in range(runs):
                timed("compact", compact)
    return tuple(Timing(statistics.median(w for w, _ in samples[name]) * 1e3,  # type: ignore[return-value]
                        statistics.median(c for _, c in samples[name]) * 1e3) for name in ("dense", "compact"))


def prepare(network: nn.Module, image: Tensor, channels_last: bool, deploy: bool,
            compile_model: bool) -> tuple[nn.Module, Tensor]:
    """The model as timed: eval mode, deployed (folded + fused), channels-last, optionally ``torch.compile``d."""
    network = network.eval()
    if deploy:
        network = deploy_network(network)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    if compile_model:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        network = torch.compile(network)
    return network, image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lr-size", default="320x180", help="LR input WIDTHxHEIGHT for the timing")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--keep", type=int, default=49, help="kept filters per prunable layer (paper: 49)")
    parser.add_argument("--keep-multiple-of", type=int, default=None, help="round kept widths (8/16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (dense once + compact several times)")
    parser.add_argument("--nchw", action="store_true", help="time in NCHW instead of channels-last")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plain", action="store_true", help="time the unmodified modules (no folding/fusion)")
    mode.add_argument("--compile", action="store_true",
                      help="also torch.compile with frozen weights (inductor, needs a C++ compiler)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    width, height = (int(value) for value in args.lr_size.lower().split("x"))
    kept = num_kept(args.features, keep=args.keep, multiple_of=args.keep_multiple_of)
    mode_name = "plain eager" if args.plain else "deploy_network + torch.compile" if args.compile else "deploy_network"
    print(f"threads={args.threads} repeats={args.repeats} layout={'NCHW' if args.nchw else 'channels_last'} "
          f"{mode_name}, LR {width}x{height}, LEDSR F{args.features} R{args.blocks} vs keep {args.keep}"
          f"{f' rounded to a multiple of {args.keep_multiple_of}: {kept}' if args.keep_multiple_of else ''}",
          flush=True)
    speedup = macs_ratio = float("nan")
    for scale in args.scales:
        dense = LEDSR(scale, num_features=args.features, num_blocks=args.blocks, pixel_range=255.0)
        compact = compact_ledsr(dense, args.keep, args.keep_multiple_of)
        image = torch.rand(1, 3, height, width) * 255.0
        macs = [macs_at_720p(network, scale) for network in (dense, compact)]
        dense_timed, timed_image = prepare(dense, image, not args.nchw, not args.plain, args.compile)
        compact_timed, _ = prepare(compact, image, not args.nchw, not args.plain, args.compile)
        times = interleaved_timing(dense_timed, compact_timed, timed_image, args.repeats)
        lr_pixels = math.prod(lr_size_for_720p(scale))
        lr_macs = [count * width * height / lr_pixels for count in macs]
        rows = zip(("dense", "compact"), (dense, compact), macs, times, lr_macs, strict=True)
        for name, network, count, timing, at_input in rows:
            print(f"x{scale} {name:<8} params={count_params(network) / 1e6:7.3f}M  GMACs@720p={count / 1e9:8.2f}  "
                  f"wall_ms={timing.wall_ms:9.1f}  cpu_ms={timing.cpu_ms:9.1f}  "
                  f"GMAC/s(wall)={at_input / timing.wall_ms / 1e6:5.1f}", flush=True)
        speedup = times[0].wall_ms / times[1].wall_ms
        cpu_speedup = times[0].cpu_ms / times[1].cpu_ms
        macs_ratio = macs[0] / macs[1]
        print(f"x{scale} macs_ratio={macs_ratio:.2f} speedup(wall)={speedup:.2f} efficiency={speedup / macs_ratio:.2f} "
              f"speedup(cpu)={cpu_speedup:.2f} efficiency(cpu)={cpu_speedup / macs_ratio:.2f}", flush=True)
    print(f"speedup={speedup:.2f} macs_ratio={macs_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
