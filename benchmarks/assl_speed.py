"""Dense LEDSR (F256 R16) vs its ASSL-pruned compact model: MACs and measured CPU time.

    python benchmarks/assl_speed.py [--scales 2 4] [--lr-size 320x180] [--keep 49] [--threads 2] [--repeats 3]

Both models are timed as deployed: ``torch.compile`` with frozen weights (``--eager`` for plain PyTorch).
The compact model is what :func:`effsr.methods.assl.prune_network` produces at the paper's ratio (keep 49
of 256 filters in every prunable layer, constrained layers aligned, the upsampler conv losing input
channels); weights are random (speed does not depend on them). Both models run the same LR image
(default 320×180, i.e. a 720p output at ×4) in inference mode, channels-last, with a fixed number of
threads; the two models are timed in alternation (so a shared machine's load hits both alike) and the
median of each model's timed runs after two warm-ups is reported. MACs are for a 1280×720 output
(conventions.md). The last line is ``speedup=X.XX macs_ratio=Y.YY`` of the last scale.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import Tensor, nn

from effsr.archs import LEDSR
from effsr.cost import count_params, lr_size_for_720p, macs_at_720p
from effsr.methods.assl import analyze_channels, compute_plan, num_kept, prune_network


def compact_ledsr(dense: LEDSR, keep: int, multiple_of: int | None = None) -> nn.Module:
    """The ASSL compact model of ``dense`` keeping ``keep`` filters per prunable layer."""
    structure = analyze_channels(dense)
    plan = compute_plan(dense, structure, keep=keep, multiple_of=multiple_of)
    return prune_network(dense, structure, plan)


def interleaved_median_ms(dense: nn.Module, compact: nn.Module, image: Tensor, rounds: int,
                          max_compact_runs: int = 10) -> tuple[float, float]:
    """Median wall times (ms) of both models, timed in alternation so both see the same machine load.

    Each round times the dense model once, then the compact model about as often as fits in the dense
    model's time (at most ``max_compact_runs``); two warm-up runs of each come first.
    """
    dense_times: list[float] = []
    compact_times: list[float] = []

    def timed(network: nn.Module) -> float:
        start = time.perf_counter()
        network(image)
        return time.perf_counter() - start

    with torch.inference_mode():
        dense(image)
        compact(image)
        ratio = timed(dense) / timed(compact)
        runs = max(1, min(max_compact_runs, round(ratio)))
        for _ in range(rounds):
            dense_times.append(timed(dense))
            compact_times.extend(timed(compact) for _ in range(runs))
    return statistics.median(dense_times) * 1e3, statistics.median(compact_times) * 1e3


def prepare(network: nn.Module, image: Tensor, channels_last: bool, compile_model: bool) -> tuple[nn.Module, Tensor]:
    """The model as timed: eval mode, optionally channels-last and ``torch.compile``d (weights frozen)."""
    network = network.eval()
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
    parser.add_argument("--eager", action="store_true",
                        help="time eager PyTorch instead of torch.compile with frozen weights (inductor, needs a C++ "
                             "compiler; falls back to eager when compiling fails)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    width, height = (int(value) for value in args.lr_size.lower().split("x"))
    kept = num_kept(args.features, keep=args.keep, multiple_of=args.keep_multiple_of)
    print(f"threads={args.threads} repeats={args.repeats} layout={'NCHW' if args.nchw else 'channels_last'} "
          f"{'eager' if args.eager else 'torch.compile'} "
          f"LR {width}x{height}, LEDSR F{args.features} R{args.blocks} vs keep {args.keep}"
          f"{f' rounded to a multiple of {args.keep_multiple_of}: {kept}' if args.keep_multiple_of else ''}")
    speedup = macs_ratio = float("nan")
    for scale in args.scales:
        dense = LEDSR(scale, num_features=args.features, num_blocks=args.blocks, pixel_range=255.0)
        compact = compact_ledsr(dense, args.keep, args.keep_multiple_of)
        image = torch.rand(1, 3, height, width) * 255.0
        macs = [macs_at_720p(network, scale) for network in (dense, compact)]
        try:
            dense_timed, timed_image = prepare(dense, image, not args.nchw, not args.eager)
            compact_timed, _ = prepare(compact, image, not args.nchw, not args.eager)
            times = interleaved_median_ms(dense_timed, compact_timed, timed_image, args.repeats)
        except Exception as error:  # noqa: BLE001 - inductor failures come in many types
            if args.eager:
                raise
            print(f"torch.compile failed ({type(error).__name__}: {error}); timing eager instead", flush=True)
            args.eager = True
            dense_timed, timed_image = prepare(dense, image, not args.nchw, False)
            compact_timed, _ = prepare(compact, image, not args.nchw, False)
            times = interleaved_median_ms(dense_timed, compact_timed, timed_image, args.repeats)
        lr_pixels = math.prod(lr_size_for_720p(scale))
        lr_macs = [count * width * height / lr_pixels for count in macs]
        rows = zip(("dense", "compact"), (dense, compact), macs, times, lr_macs, strict=True)
        for name, network, count, milliseconds, at_input in rows:
            print(f"x{scale} {name:<8} params={count_params(network) / 1e6:8.3f}M  GMACs@720p={count / 1e9:9.2f}  "
                  f"ms={milliseconds:10.1f}  GMAC/s={at_input / milliseconds / 1e6:6.1f}", flush=True)
        speedup = times[0] / times[1]
        macs_ratio = macs[0] / macs[1]
        print(f"x{scale} speedup={speedup:.2f} macs_ratio={macs_ratio:.2f} "
              f"efficiency={speedup / macs_ratio:.2f}", flush=True)
    print(f"speedup={speedup:.2f} macs_ratio={macs_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
