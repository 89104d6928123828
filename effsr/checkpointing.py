"""Checkpoint writing that never leaves a half-written file, and safe loading of foreign checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from effsr.distributed import rank
from effsr.weights import read_checkpoint


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` (atomic on POSIX)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves are atomic: an interrupted save keeps the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Makes the trainer's checkpoint writes atomic, whatever plugins the config passed.

    Lightning's default :class:`TorchCheckpointIO` (also when a wrapper such as ``AsyncCheckpointIO`` was given
    without a base) is replaced by :class:`AtomicCheckpointIO`; a custom CheckpointIO of the user's is kept.
    Done on the instantiated trainer so that the config (and its dump) never holds a CheckpointIO instance.
    """
    strategy = trainer.strategy
    checkpoint_io = strategy.checkpoint_io  # Lightning's getter fills in its default
    if type(checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(checkpoint_io, _WrappingCheckpointIO) and type(checkpoint_io.checkpoint_io) is TorchCheckpointIO:
        # the wrapper's setter ignores a new base once one is configured, hence the attribute
        checkpoint_io._checkpoint_io = AtomicCheckpointIO()


def run_config_path(trainer: L.Trainer) -> Path | None:
    """The ``config.yaml`` that ``effsr fit`` wrote for this run, if any (``trainer.log_dir`` is a collective:
    call it on every rank)."""
    for folder in (trainer.log_dir or "", trainer.default_root_dir):
        if folder and (Path(folder) / "config.yaml").is_file():
            return Path(folder) / "config.yaml"
    return None


def save_side_checkpoint(trainer: L.Trainer, name: str) -> Path:
    """The whole training state now, as ``<default_root_dir>/<name>/<name>.ckpt`` plus the run's ``config.yaml``
    beside it, so an intermediate model of a pipeline (ClassSR before joint, ASSL right after pruning) can be
    evaluated as a model of its own. Every rank must call it (Lightning saves on rank 0)."""
    folder = Path(trainer.default_root_dir) / name
    path = folder / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    source = run_config_path(trainer)
    if source is not None and rank() == 0:
        handle, temporary = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=folder)
        with os.fdopen(handle, "w") as stream:
            stream.write(source.read_text())
        os.replace(temporary, folder / "config.yaml")
    return path


def load_untrusted(path: _PATH, what: str = "checkpoint") -> Any:
    """Loads a checkpoint from elsewhere under effsr's one policy, :func:`effsr.weights.read_checkpoint`
    (``weights_only=True``): anything that would need arbitrary unpickling is refused."""
    return read_checkpoint(path, what)


def training_ends_after_this_batch(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` of the last batch of a fit: ``max_steps`` reached, or a stop was requested
    (a finished PhaseSchedule pipeline, early stopping) that ``min_steps``/``min_epochs`` allow."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    return bool(trainer.should_stop and getattr(trainer.fit_loop, "_can_stop_early", True))


class EpochEndCheckpoint(ModelCheckpoint):
    """Writes checkpoints (and ``last.ckpt``) after the last optimizer step of every epoch and of the fit.

    Lightning resumes a checkpoint taken at the end of the epoch's last training batch by starting the next
    epoch cleanly, whereas one taken in ``on_train_epoch_end`` makes it re-enter the finished epoch and
    shift the data stream by a batch. Saving here makes ``--ckpt_path last`` resume exactly (same data,
    same weights as an uninterrupted run). When training ends inside an epoch (``max_steps``, or a pipeline
    whose last phase ends), the final state is written too, so ``last.ckpt`` holds the finished run. A monitored
    metric is the latest validation's.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        epoch_end = batch_idx + 1 == trainer.num_training_batches
        if not (epoch_end or training_ends_after_this_batch(trainer)) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Saving happened at the last batch end."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Saving happens at the last batch end of each epoch only."""
