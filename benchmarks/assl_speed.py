"""Dense LEDSR (F256 R16) vs its ASSL-pruned compact models: MACs and measured wall and CPU time, in one run.

    python benchmarks/assl_speed.py [--scales 2 4] [--lr-size 320x180] [--keep 49] [--keep-multiple-of 1 8]
                                    [--threads 2] [--repeats 3] [--plain | --compile] [--nchw]

Each compact model is what :func:`effsr.methods.assl.prune_network` produces at the paper's ratio (keep 49
of 256 filters in every prunable layer, constrained layers aligned, the upsampler conv losing input
channels), once per ``--keep-multiple-of`` value: 1 keeps exactly ``--keep``, the default second value is
this CPU's vector width (:func:`effsr.methods.assl.deploy.hardware_channel_multiple`: 8 on AVX2, 16 on
AVX-512; both round 49 to 48). Weights are random (speed does not depend on them). All models are timed as
deployed, the same way: :func:`effsr.methods.assl.deploy_network` (eager PyTorch; res_scale and mean shift
folded, conv+ReLU and conv+residual fused into single oneDNN calls), channels-last; ``--plain`` times the
unmodified modules, ``--compile`` adds ``torch.compile`` with frozen weights (opt-in). All run the same LR
image (default 320×180, i.e. a 720p output at ×4) in inference mode with a fixed number of threads, timed
in alternation (each round: the dense model once, then every compact model about as often as fits in that
time) after a warm-up of each; medians of wall and process-CPU time. MACs are for a 1280×720 output
(docs/protocol.md), counted on a meta-device copy (shapes only, no 720p forward of the dense model).

Run as a script it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment or ``--omp-wait-policy`` says
otherwise: with libgomp's default waits (spin, then sleep), on a CPU shared with other jobs, the thread that
finishes its half of a conv first spins on the core its descheduled partner needs; both models end every
conv at such a barrier, and the compact model meets 27× more of them per MAC (docs/benchmarks.md). The
header prints the policy and the load average. The last line is ``speedup=X.XX macs_ratio=Y.YY`` (wall
time) of the last compact model at the last scale.
"""

from __future__ import annotations

import argparse
import os

WAIT_POLICIES = ("passive", "active", "default")


def set_wait_policy(policy: str | None) -> None:
    """Sets ``OMP_WAIT_POLICY`` for libgomp, which reads it when torch loads it (so: before importing torch).

    ``None`` keeps the environment's value, else PASSIVE; ``"default"`` unsets it (libgomp's own: spin about
    300k iterations, then sleep).
    """
    if policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


if __name__ == "__main__":
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--omp-wait-policy", choices=WAIT_POLICIES)
    set_wait_policy(_early.parse_known_args()[0].omp_wait_policy)

import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from effsr.archs import LEDSR  # noqa: E402
from effsr.cost import count_params, lr_size_for_720p, meta_macs_720p  # noqa: E402
from effsr.methods.assl import analyze_channels, compute_plan, deploy_network, num_kept, prune_network  # noqa: E402
from effsr.methods.assl.deploy import hardware_channel_multiple  # noqa: E402


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


def interleaved_timing(dense: nn.Module, compacts: dict[str, nn.Module], image: Tensor, rounds: int,
                       max_compact_runs: int = 10) -> tuple[Timing, dict[str, Timing]]:
    """Medians of the dense and every compact model's wall and CPU times, timed in alternation so all see
    the same machine load.

    Each round times the dense model once, then each compact model about as often as fits in the dense
    model's time (at most ``max_compact_runs``); one warm-up run of each comes first and sets those counts.
    """
    dense_samples: list[tuple[float, float]] = []
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in compacts}

    def timed(into: list[tuple[float, float]], network: nn.Module) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        network(image)
        into.append((time.perf_counter() - wall, time.process_time() - cpu))
        return into[-1][0]

    def median(values: list[tuple[float, float]]) -> Timing:
        return Timing(statistics.median(w for w, _ in values) * 1e3, statistics.median(c for _, c in values) * 1e3)

    with torch.inference_mode():
        dense_wall = timed([], dense)
        runs = {name: max(1, min(max_compact_runs, round(dense_wall / timed([], network))))
                for name, network in compacts.items()}
        for _ in range(rounds):
            timed(dense_samples, dense)
            for name, network in compacts.items():
                for _ in range(runs[name]):
                    timed(samples[name], network)
    return median(dense_samples), {name: median(values) for name, values in samples.items()}


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


def load() -> str:
    """The 1/5/15-minute load averages (other jobs on the machine change what both clocks measure)."""
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def print_row(label: str, network: nn.Module, macs: int, timing: Timing, lr_scale: float) -> None:
    """One model's params, MACs@720p, median times and throughput (``lr_scale``: timed LR pixels / 720p LR's)."""
    print(f"{label:<12} params={count_params(network) / 1e6:7.3f}M  GMACs@720p={macs / 1e9:8.2f}  "
          f"wall_ms={timing.wall_ms:9.1f}  cpu_ms={timing.cpu_ms:9.1f}  "
          f"GMAC/s(wall)={macs * lr_scale / timing.wall_ms / 1e6:5.1f}  "
          f"GMAC/s(cpu)={macs * lr_scale / timing.cpu_ms / 1e6:5.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lr-size", default="320x180", help="LR input WIDTHxHEIGHT for the timing")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--keep", type=int, default=49, help="kept filters per prunable layer (paper: 49)")
    parser.add_argument("--keep-multiple-of", type=int, nargs="+", default=None, metavar="M",
                        help="one compact model per value, kept widths rounded to a multiple of M (1: exactly "
                             "--keep); default: 1 and this CPU's vector width (8 on AVX2, 16 on AVX-512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (dense once + compacts several times)")
    parser.add_argument("--nchw", action="store_true", help="time in NCHW instead of channels-last")
    parser.add_argument("--omp-wait-policy", choices=WAIT_POLICIES,
                        help="OpenMP waits (default: $OMP_WAIT_POLICY, else passive; 'default': libgomp's own)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plain", action="store_true", help="time the unmodified modules (no folding/fusion)")
    mode.add_argument("--compile", action="store_true",
                      help="also torch.compile with frozen weights (inductor, needs a C++ compiler)")
    args = parser.parse_args()
    multiples = args.keep_multiple_of or [1, hardware_channel_multiple("cpu")]
    if any(multiple < 1 for multiple in multiples):
        parser.error(f"--keep-multiple-of values must be ≥ 1, got {multiples}")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    width, height = (int(value) for value in args.lr_size.lower().split("x"))
    kept = {multiple: num_kept(args.features, keep=args.keep, multiple_of=multiple) for multiple in multiples}
    mode_name = "plain eager" if args.plain else "deploy_network + torch.compile" if args.compile else "deploy_network"
    print(f"threads={args.threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(libgomp default)')} "
          f"cpu={torch.backends.cpu.get_cpu_capability()} repeats={args.repeats} "
          f"layout={'NCHW' if args.nchw else 'channels_last'} {mode_name}, LR {width}x{height}, "
          f"LEDSR F{args.features} R{args.blocks} vs keep {args.keep} rounded to multiples of "
          f"{', '.join(f'{multiple}: {count}' for multiple, count in kept.items())}; load {load()}", flush=True)
    speedup = macs_ratio = float("nan")
    for scale in args.scales:
        dense = LEDSR(scale, num_features=args.features, num_blocks=args.blocks, pixel_range=255.0)
        compacts = {f"keep{count}": compact_ledsr(dense, args.keep, multiple) for multiple, count in kept.items()}
        image = torch.rand(1, 3, height, width) * 255.0
        dense_timed, timed_image = prepare(dense, image, not args.nchw, not args.plain, args.compile)
        compacts_timed = {name: prepare(network, image, not args.nchw, not args.plain, args.compile)[0]
                          for name, network in compacts.items()}
        started = time.perf_counter(), time.process_time()
        dense_time, compact_times = interleaved_timing(dense_timed, compacts_timed, timed_image, args.repeats)
        print(f"x{scale} timed in {time.perf_counter() - started[0]:.0f} s wall, "
              f"{time.process_time() - started[1]:.0f} s CPU; load {load()}", flush=True)
        lr_scale = width * height / math.prod(lr_size_for_720p(scale))
        dense_macs = meta_macs_720p(dense, scale)

        print_row(f"x{scale} dense", dense, dense_macs, dense_time, lr_scale)
        for name, network in compacts.items():
            macs = meta_macs_720p(network, scale)
            timing = compact_times[name]
            print_row(f"x{scale} {name}", network, macs, timing, lr_scale)
            speedup, macs_ratio = dense_time.wall_ms / timing.wall_ms, dense_macs / macs
            cpu_speedup = dense_time.cpu_ms / timing.cpu_ms
            print(f"x{scale} {name} macs_ratio={macs_ratio:.2f} speedup(wall)={speedup:.2f} "
                  f"efficiency={speedup / macs_ratio:.2f} speedup(cpu)={cpu_speedup:.2f} "
                  f"efficiency(cpu)={cpu_speedup / macs_ratio:.2f}", flush=True)
    print(f"speedup={speedup:.2f} macs_ratio={macs_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
