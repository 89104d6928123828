"""The experiments of ``benchmarks/reproduce.py``, declared as data.

An :class:`Experiment` is a list of :class:`ModelDecl`: the method, its baselines and variants. A model is
trained by a sequence of ``effsr fit`` stages (:class:`FitStage`: a config and CLI overrides; ``{prev}`` in an
override is the final checkpoint of the previous stage, e.g. ``--ckpt_path={prev}`` or a method's
``--model.init_args.<...>_checkpoint={prev}``), or has no stages and is evaluated as it is (``compare_as``:
``bicubic`` or a config). The four method experiments (ASSL, SLS N:M, SMSR, ClassSR) are added here as new
entries of :data:`EXPERIMENTS` without touching the harness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Role = Literal["method", "baseline", "variant"]


@dataclass(frozen=True)
class ExtraContext:
    """What an ``extra`` extractor sees of one finished model: its checkpoint (None without training), its
    ``compare.json`` entry and the training seconds recorded by the harness."""

    checkpoint: Path | None
    entry: dict[str, Any]
    train_seconds: float | None


Extractor = Callable[[ExtraContext], dict[str, Any]]


@dataclass(frozen=True)
class FitStage:
    """One ``effsr fit`` run: a repository-relative config plus overrides (``{prev}``: previous checkpoint)."""

    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelDecl:
    """A model of an experiment. ``seeded`` models are trained once per seed; ``extra`` adds model-specific
    numbers (sparsity, pruned width, routing) to the experiment JSON."""

    name: str
    role: Role
    stages: tuple[FitStage, ...] = ()
    compare_as: str | None = None
    seeded: bool = True
    extra: Extractor | None = None

    def __post_init__(self) -> None:
        if bool(self.stages) == bool(self.compare_as):
            raise ValueError(f"model {self.name!r}: declare either fit stages or compare_as, not both/neither")


@dataclass(frozen=True)
class Experiment:
    """A reproduction: models compared at one scale; ``claim`` = (method, baseline) the reading is about."""

    name: str
    scale: int
    summary: str
    models: tuple[ModelDecl, ...]
    claim: tuple[str, str]
    test_only: bool = field(default=False)  # a harness self-test, not listed as a reproduction


def training_record(context: ExtraContext) -> dict[str, Any]:
    """Optimizer steps of the final checkpoint and the recorded training time."""
    if context.checkpoint is None:
        return {}
    checkpoint = torch.load(context.checkpoint, map_location="cpu", weights_only=False)
    return {"global_step": int(checkpoint.get("global_step", -1)), "train_seconds": context.train_seconds}


_EDSR_SMALL = "experiments/small/edsr_small_x2.yaml"
_BICUBIC = ModelDecl("bicubic", "baseline", compare_as="bicubic", seeded=False)

EXPERIMENTS: dict[str, Experiment] = {
    experiment.name: experiment
    for experiment in (
        Experiment(
            name="edsr_small_x2",
            scale=2,
            summary="The demo's EDSR-small (32 features, 4 blocks) trained 400 steps vs MATLAB bicubic at ×2.",
            models=(ModelDecl("edsr_small", "method", (FitStage(_EDSR_SMALL),), extra=training_record), _BICUBIC),
            claim=("edsr_small", "bicubic"),
        ),
        Experiment(
            name="smoke",
            scale=2,
            summary="Harness self-test: a width-8 EDSR-small trained 4 steps vs bicubic (tests only).",
            models=(
                ModelDecl("edsr_tiny", "method", (FitStage(_EDSR_SMALL, (
                    "--trainer.max_steps=4", "--data.samples_per_epoch=16", "--data.batch_size=4",
                    "--data.lr_patch_size=16", "--data.num_workers=0",
                    "--model.init_args.network.init_args.num_features=8",
                    "--model.init_args.network.init_args.num_blocks=1")),), extra=training_record),
                _BICUBIC,
            ),
            claim=("edsr_tiny", "bicubic"),
            test_only=True,
        ),
    )
}
