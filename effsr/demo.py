"""``effsr demo``: train a small model on the embedded sample set, then compare it with MATLAB bicubic.

Everything it needs ships with the installed packages (the sample photographs come from scikit-image),
so it runs on a fresh machine without downloads. It prints a table of Y-PSNR/SSIM, MACs, params and time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effsr.cli import PACKAGE_CONFIGS, EffSRCLI


def _test(config: Path, root: Path, name: str, *extra: str) -> dict:
    results_dir = root / name
    EffSRCLI(args=["test", "--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.logger=false",
                   "--model.init_args.results_dir", str(results_dir), *extra])
    return json.loads((results_dir / "test_results.json").read_text())


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effsr demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="output folder (checkpoints, W&B run, results)")
    parser.add_argument("--max_steps", type=int, default=None, help="override the demo's training length")
    args = parser.parse_args(argv)
    root = Path(args.root)
    config, bicubic_config = PACKAGE_CONFIGS / "demo.yaml", PACKAGE_CONFIGS / "demo_bicubic.yaml"

    extra = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]
    if args.max_steps is not None:
        extra += ["--trainer.max_steps", str(args.max_steps)]
    start = time.perf_counter()
    fit = EffSRCLI(args=["fit", "--config", str(config), *extra])
    train_seconds = time.perf_counter() - start
    checkpoint = Path(fit.trainer.checkpoint_callback.last_model_path or root / "checkpoints" / "last.ckpt")

    start = time.perf_counter()
    trained = _test(config, root, "trained", "--ckpt_path", str(checkpoint))
    trained_seconds = time.perf_counter() - start
    start = time.perf_counter()
    bicubic = _test(bicubic_config, root, "bicubic")
    bicubic_seconds = time.perf_counter() - start

    print(format_demo_table(bicubic, trained, bicubic_seconds, trained_seconds, train_seconds))
    gain = min(trained[name]["psnr_y"] - bicubic[name]["psnr_y"] for name in trained)
    verdict = "beats" if gain > 0 else "does NOT beat"
    print(f"\nThe trained model {verdict} bicubic on the held-out images (worst set: {gain:+.2f} dB Y-PSNR).")
    print(f"Checkpoint: {checkpoint}\nW&B run (offline unless you are logged in): {root / 'wandb'}")
    return 0 if gain > 0 else 1


def format_demo_table(bicubic: dict, trained: dict, bicubic_seconds: float, trained_seconds: float,
                      train_seconds: float) -> str:
    header = (f"{'model':<22}{'set':<10}{'n':>3}{'PSNR-Y':>9}{'SSIM-Y':>9}{'GMACs@720p':>12}"
              f"{'params':>10}{'time [s]':>16}")
    lines = [header, "-" * len(header)]
    rows = [("bicubic (MATLAB)", bicubic, f"{bicubic_seconds:.1f} test"),
            ("EDSR-small (trained)", trained, f"{train_seconds:.0f} fit+{trained_seconds:.1f}")]
    for label, results, timing in rows:
        for set_name, row in results.items():
            lines.append(f"{label:<22}{set_name:<10}{row['n_images']:>3}{row['psnr_y']:>9.2f}{row['ssim_y']:>9.4f}"
                         f"{row.get('macs_720p', 0) / 1e9:>12.2f}{row.get('params', 0) / 1e3:>9.1f}K{timing:>16}")
    return "\n".join(lines)
