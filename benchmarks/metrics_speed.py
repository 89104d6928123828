"""Times Y-SSIM of a 2040x1356 pair (a photograph and its bicubic x4 round trip with mild noise): the
reference five float64 11x11 conv2d's (benchmarks/_reference_ssim.py) vs effsr.metrics.ssim.

Both run interleaved (one call of each per repeat, after a warm-up call each) and the medians are compared,
so load from other processes affects both alike. Two clocks: per-core CPU time with one torch thread (robust
on a shared machine) and wall time with the default thread count; `--clock` picks the one of the last line.
Also prints the largest relative difference of the per-image values (y_channel True and False).

    python benchmarks/metrics_speed.py [--repeats 5] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from skimage import data

from effsr.metrics import ssim
from effsr.ops import imresize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_ssim import reference_ssim  # noqa: E402
from imresize_speed import interleaved_medians  # noqa: E402


def image_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(sr, hr) float32 (1,3,1356,2040) in [0,1]: astronaut photo resized up, and its degraded copy."""
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255
    hr = imresize(photo, output_size=(1356, 2040)).clamp(0, 1)
    noise = 0.02 * torch.randn(hr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sr = (imresize(imresize(hr, 0.25), 4.0) + noise).clamp(0, 1)
    return sr.float(), hr.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="clock of the last line's speedup (cpu: per-core CPU time with 1 thread)")
    args = parser.parse_args()
    sr, hr = image_pair()
    max_rel_diff = 0.0
    for y_channel in (True, False):
        reference = reference_ssim(sr, hr, crop_border=4, y_channel=y_channel)
        value = ssim(sr, hr, crop_border=4, y_channel=y_channel)
        max_rel_diff = max(max_rel_diff, ((value - reference).abs() / reference.abs()).max().item())
        print(f"y_channel={y_channel}: reference={reference.item():.15f} effsr={value.item():.15f}")
    variants = {
        "reference": lambda: reference_ssim(sr, hr, crop_border=4),
        "effsr": lambda: ssim(sr, hr, crop_border=4),
    }
    threads = torch.get_num_threads()
    wall = interleaved_medians(variants, args.repeats, time.perf_counter)
    torch.set_num_threads(1)
    cpu = interleaved_medians(variants, args.repeats, time.process_time)
    torch.set_num_threads(threads)
    for name in variants:
        print(f"{name}: cpu_ms_1thread={cpu[name]:.1f} wall_ms_{threads}threads={wall[name]:.1f}")
    print(f"cpu_speedup_1thread={cpu['reference'] / cpu['effsr']:.1f} "
          f"wall_speedup_{threads}threads={wall['reference'] / wall['effsr']:.1f}")
    chosen = cpu if args.clock == "cpu" else wall
    print(f"ssim_speedup={chosen['reference'] / chosen['effsr']:.1f} max_rel_diff={max_rel_diff:.1e}")


if __name__ == "__main__":
    main()
