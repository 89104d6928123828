"""What an evaluation leaves behind: ``test_results.json`` (earlier files kept) and the console summaries.

Rows are ``{set: {psnr_y, ssim_y, psnr_rgb, n_images, macs_720p, params, ..., images: {...}}}`` as built by
:class:`effsr.models.SRModule`; the console gets one table per ``effsr test`` / ``effsr validate`` and one
line per validation during ``effsr fit`` (printed on rank 0 only, through the progress bar so no line is
glued onto a bar).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HISTORY = "test_results_history"


def write_test_results(root: Path, results: Mapping[str, Any]) -> tuple[Path, bool]:
    """Writes ``root/test_results.json`` atomically; an existing file moves to ``test_results_history/``.

    Returns the path and whether earlier results are kept in the history folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "test_results.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2))
    if path.exists():
        history = root / HISTORY
        history.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = history / f"test_results-{stamp}.json"
        suffix = 1
        while kept.exists():
            kept = history / f"test_results-{stamp}-{suffix}.json"
            suffix += 1
        os.replace(path, kept)
    os.replace(temporary, path)
    return path, (root / HISTORY).exists()


def format_results_table(title: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per set: PSNR-Y, SSIM-Y, PSNR-RGB, images, GMACs for a 1280×720 output, params (M)."""
    header = f"{'set':<16}{'psnr_y':>9}{'ssim_y':>9}{'psnr_rgb':>10}{'n_images':>10}{'GMACs@720p':>12}{'params':>11}"
    lines = [title, header, "-" * len(header)]
    for set_name, row in results.items():
        lines.append(
            f"{set_name:<16}{row['psnr_y']:>9.3f}{row['ssim_y']:>9.4f}{row['psnr_rgb']:>10.3f}{row['n_images']:>10}"
            f"{row.get('macs_720p', math.nan) / 1e9:>12.2f}{row.get('params', math.nan) / 1e6:>10.3f}M"
        )
    return "\n".join(lines)


def format_val_summary(step: int, results: Mapping[str, Mapping[str, Any]]) -> str:
    """``val step 1200 | Set5 psnr_y 30.12 ssim_y 0.8650 | Set14 ...`` (one line per validation)."""
    parts = [f"{name} psnr_y {row['psnr_y']:.2f} ssim_y {row['ssim_y']:.4f}" for name, row in results.items()]
    return " | ".join([f"val step {step}", *parts])


def console_print(trainer: Any, text: str) -> None:
    """Prints ``text`` on global rank 0, through the trainer's progress bar when one is shown (so the text
    starts on a fresh line and the bar is redrawn below it)."""
    if trainer is not None and not getattr(trainer, "is_global_zero", True):
        return
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is None or not getattr(bar, "is_enabled", False):
        print(text, flush=True)
        return
    from lightning.pytorch.callbacks import TQDMProgressBar

    if isinstance(bar, TQDMProgressBar):  # Lightning's bars write to stdout; tqdm.write clears and redraws them
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        bar.print(text)
