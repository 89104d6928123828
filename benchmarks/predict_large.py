"""A 2000×2000 LR image through `effsr predict` with tiling: wall time and peak memory (max RSS).

    python benchmarks/predict_large.py [--config experiments/edsr_baseline_x4.yaml] [--size 2000]

The LR image is a scikit-image photograph upscaled with the MATLAB bicubic; the model has random weights
(speed and memory do not depend on them). Peak memory is the child process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def make_lr_image(path: Path, size: int) -> None:
    from skimage import data

    from effsr.data.io import write_image
    from effsr.ops import imresize

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).double()[None]
    large = imresize(photo, output_size=(size, size))
    write_image(path, large[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "edsr_baseline_x4.yaml"))
    parser.add_argument("--size", type=int, default=2000, help="LR height = width")
    parser.add_argument("--tile_size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lr_dir, out_dir = Path(folder) / "lr", Path(folder) / "sr"
        lr_dir.mkdir()
        make_lr_image(lr_dir / "large.png", args.size)
        command = [sys.executable, "-m", "effsr.cli", "predict", "--config", args.config, "--trainer.logger=false",
                   f"--data.predict_path={lr_dir}", f"--output_dir={out_dir}", "--trainer.default_root_dir", folder,
                   f"--model.init_args.tile_size={args.tile_size}", "--trainer.accelerator=cpu"]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            print(result.stderr[-4000:])
            return 1
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        from effsr.data.io import read_image

        sr = read_image(out_dir / "large.png")
        output_mib = np.prod(sr.shape) * 4 / 2**20
        print(f"config={Path(args.config).name} lr={args.size}x{args.size} sr={sr.shape[1]}x{sr.shape[0]} "
              f"tile={args.tile_size} threads={torch.get_num_threads()}")
        print(f"wall_s={seconds:.1f} peak_rss_mib={peak_mib:.0f} float_output_mib={output_mib:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
