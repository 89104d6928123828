"""Times a 2040x1356 RGB uint8 image resized down by 4: the plain numpy reference port vs effsr's imresize_uint8.

The variants run interleaved (one call of each per repeat) and the medians are compared, so load from other
processes affects all of them alike. Two clocks: per-core CPU time with one torch thread (robust on a shared
machine) and wall time with the default thread count. Also checks that the outputs agree.

    python benchmarks/imresize_speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage import data

from effsr.ops import imresize, imresize_uint8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_imresize import reference_imresize_uint8  # noqa: E402


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int,
                        clock: Callable[[], float]) -> dict[str, float]:
    """Median ms per variant; every repeat runs each variant once, after one warm-up call each."""
    for function in variants.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            start = clock()
            function()
            times[name].append((clock() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).double()
    large = imresize(photo, output_size=(1356, 2040)).clamp(0, 255).round().to(torch.uint8)
    image = np.ascontiguousarray(large.permute(1, 2, 0).numpy())
    variants = {
        "reference": lambda: reference_imresize_uint8(image, 0.25),
        "effsr_float64": lambda: imresize_uint8(image, 0.25),
        "effsr_float32": lambda: imresize_uint8(image, 0.25, compute_dtype=torch.float32),
    }
    reference = reference_imresize_uint8(image, 0.25).astype(int)
    for name in ("effsr_float64", "effsr_float32"):
        difference = np.abs(variants[name]().astype(int) - reference)
        print(f"{name}: identical_pixels={100 * (difference == 0).mean():.4f}% max_abs_diff={difference.max()}")
    threads = torch.get_num_threads()
    wall = interleaved_medians(variants, args.repeats, time.perf_counter)
    torch.set_num_threads(1)
    cpu = interleaved_medians(variants, args.repeats, time.process_time)
    torch.set_num_threads(threads)
    for name in variants:
        print(f"{name}: cpu_ms_1thread={cpu[name]:.1f} wall_ms_{threads}threads={wall[name]:.1f}")
    print(f"wall_speedup_float32={wall['reference'] / wall['effsr_float32']:.1f}")
    print(f"speedup_vs_reference={cpu['reference'] / cpu['effsr_float64']:.1f} "
          f"speedup_float32_vs_reference={cpu['reference'] / cpu['effsr_float32']:.1f}")


if __name__ == "__main__":
    main()
