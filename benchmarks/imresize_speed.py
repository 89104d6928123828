"""Times a 2040x1356 RGB uint8 image resized down by 4: reference numpy port vs effsr.ops.imresize_uint8."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data

from effsr.ops import imresize, imresize_uint8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_imresize import reference_imresize_uint8  # noqa: E402


def median_ms(function, runs: int = 5) -> float:
    """Median wall time of ``runs`` calls after one warm-up, in ms."""
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).double()
    large = imresize(photo, output_size=(1356, 2040)).clamp(0, 255).round().to(torch.uint8)
    image = np.ascontiguousarray(large.permute(1, 2, 0).numpy())
    reference_ms = median_ms(lambda: reference_imresize_uint8(image, 0.25))
    effsr_ms = median_ms(lambda: imresize_uint8(image, 0.25))
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"reference_ms={reference_ms:.1f}")
    print(f"effsr_ms={effsr_ms:.1f}")
    print(f"speedup_vs_reference={reference_ms / effsr_ms:.1f}")


if __name__ == "__main__":
    main()
