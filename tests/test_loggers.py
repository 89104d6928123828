"""W&B logger preparation: the run folder is fixed against the cwd of the process that prepared it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from effsr.loggers import prepare_wandb_logger

pytestmark = pytest.mark.unit


def test_relative_save_dir_becomes_absolute_for_wandb_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb-core resolves a relative ``dir`` in its own cwd; after preparation both the logger's save_dir and the
    ``dir`` handed to ``wandb.init`` name the folder under this process's cwd, also after a later chdir."""
    monkeypatch.chdir(tmp_path)
    logger = WandbLogger(save_dir="runs/exp", project="effsr-test", offline=True)
    prepare_wandb_logger(logger)
    expected = str(tmp_path / "runs" / "exp")
    monkeypatch.chdir(tmp_path.parent)
    assert logger.save_dir == expected and os.path.isabs(logger.save_dir)
    assert logger._wandb_init["dir"] == expected  # what wandb.init receives when the run starts
    assert (tmp_path / "runs" / "exp").is_dir()
