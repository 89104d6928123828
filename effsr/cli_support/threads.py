"""The CPU thread count of a run: ``--threads``, else OMP_NUM_THREADS, else torch's default, said in one line."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_only

from effsr.errors import ConfigError


def apply_thread_count(threads: int | None, announce: bool = True) -> tuple[int, str]:
    """Sets torch's intra-op CPU threads: ``threads`` when given, else OMP_NUM_THREADS when set, else torch's
    default. Returns (count, why) and prints one line saying so (rank 0 only)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        value = os.environ["OMP_NUM_THREADS"].strip()
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={value!r} is not a positive integer; unset it or use --threads N")
        torch.set_num_threads(int(value))
        why = "OMP_NUM_THREADS"
    else:
        why = f"torch's default for {os.cpu_count()} CPUs; set --threads N or OMP_NUM_THREADS to change it"
    count = torch.get_num_threads()
    if announce and rank_zero_only.rank == 0:
        print(f"[effsr] {count} CPU thread{'s' if count != 1 else ''} ({why})", flush=True)
    return count, why
