"""Multi-stage pipelines as a callback-driven phase schedule.

A :class:`PhaseSchedule` holds an ordered list of :class:`Phase` (name, length in optimizer steps or "until"
a condition the module reports, free-form settings the module interprets) and continuous
:class:`ParamSchedule` (Gumbel temperature, regularisation ramps). On entering a phase it calls
``module.enter_phase(name, settings)`` (:class:`effsr.models.SRModule`); when the trainable set or the
architecture changed it rebuilds the optimizers/LR schedulers and, under DDP, re-wraps the model so the
reducer knows the new parameter set (frozen or removed parameters would otherwise make DDP fail with
"Expected to have finished reduction ..."). Its state is in every checkpoint, so ``--ckpt_path last``
resumes mid-phase. A phase setting ``batch_size`` sets the per-rank training batch size
(``SRDataModule.set_batch_size``) at the phase's start and on a resume inside it; phases without it use
``data.batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from effsr.data.sources import check_batch_size
from effsr.errors import ConfigError


@runtime_checkable
class PhaseDriven(Protocol):
    """What a PhaseSchedule needs of its LightningModule (:class:`effsr.models.SRModule` provides it)."""

    phase_name: str | None
    phase_settings: dict[str, Any]

    def enter_phase(self, name: str, settings: dict[str, Any]) -> bool: ...

    def on_phase_resumed(self, name: str, settings: dict[str, Any]) -> None: ...

    def phase_condition(self, name: str) -> bool: ...

    def set_schedule_value(self, name: str, value: float) -> None: ...


@runtime_checkable
class BatchSizeSettable(Protocol):
    """A data module whose training batch size a phase may change (:class:`effsr.data.SRDataModule`)."""

    batch_size: int

    @property
    def train_batch_size(self) -> int: ...

    def set_batch_size(self, batch_size: int) -> None: ...


@dataclass
class Phase:
    """One stage of a pipeline.

    Args:
        name: what the module sees in ``on_phase_start`` (e.g. ``ssa``, ``search``, ``finetune``).
        steps: length in optimizer steps; ``None`` with no ``until`` = until training stops.
        until: name of a condition the module reports (``phase_condition``), e.g. ``budget_reached``.
        max_steps: upper bound on an ``until`` phase.
        settings: interpreted by the module: ``lr``, ``trainable`` (parameter-name prefixes), loss
            weights, ``rebuild_optimizer``, ``keep_optimizer_state`` (a rebuilt optimizer takes over the state
            of the parameters that persist) and method-specific keys; ``batch_size`` (per-rank training
            batch size of the phase, default ``data.batch_size``) is applied to the data module.
    """

    name: str
    steps: int | None = None
    until: str | None = None
    max_steps: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParamSchedule:
    """A continuous hyper-parameter pushed to the module every step (``set_schedule_value``).

    Args:
        name: the value's name (e.g. ``tau``); logged as ``schedule/<name>``.
        start: value at ``begin_step``.
        end: value at ``end_step`` and after (also the floor/ceiling of a ``step`` schedule).
        shape: ``linear``, ``cosine``, ``exponential``, ``constant`` or ``step`` (× ``gamma`` every ``step_size``).
        begin_step: first step of the ramp.
        end_step: last step of the ramp.
        phase: if set, steps count from that phase's start and the value is only pushed in that phase.
    """

    name: str
    start: float
    end: float | None = None
    shape: Literal["linear", "cosine", "exponential", "constant", "step"] = "linear"
    begin_step: int = 0
    end_step: int | None = None
    phase: str | None = None
    step_size: int | None = None
    gamma: float = 0.5

    def value(self, step: int) -> float:
        """The value at ``step`` (global, or phase-local when ``phase`` is set)."""
        end = self.start if self.end is None else self.end
        if self.shape == "constant":
            return self.start
        if self.shape == "step":
            if not self.step_size:
                raise ConfigError(f"schedule '{self.name}': shape 'step' needs step_size")
            value = self.start * self.gamma ** (max(0, step - self.begin_step) // self.step_size)
            if self.end is not None:
                value = max(value, end) if self.gamma < 1 else min(value, end)
            return value
        if self.end_step is None or self.end_step <= self.begin_step:
            raise ConfigError(f"schedule '{self.name}': shape '{self.shape}' needs end_step > begin_step")
        progress = min(1.0, max(0.0, (step - self.begin_step) / (self.end_step - self.begin_step)))
        if self.shape == "linear":
            return self.start + (end - self.start) * progress
        if self.shape == "cosine":
            return end + (self.start - end) * (1 + math.cos(math.pi * progress)) / 2
        if self.start <= 0 or end <= 0:
            raise ConfigError(f"schedule '{self.name}': an exponential schedule needs positive start and end")
        return self.start * (end / self.start) ** progress


class PhaseSchedule(Callback):
    """Runs a pipeline of phases; see the module docstring and ``docs/design.md``.

    Args:
        phases: the ordered phases.
        schedules: continuous hyper-parameter schedules.
        check_every: how often (steps) an ``until`` condition is evaluated.
        stop_after_last: stop training when the last phase with a fixed length ends.
    """

    def __init__(self, phases: list[Phase], schedules: list[ParamSchedule] | None = None, check_every: int = 1,
                 stop_after_last: bool = True) -> None:
        if not phases:
            raise ConfigError("PhaseSchedule needs at least one phase")
        names = [phase.name for phase in phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"PhaseSchedule phase names must be unique, got {names}")
        for phase in phases:
            if phase.steps is not None and phase.steps < 0:
                raise ConfigError(f"phase '{phase.name}': steps must be ≥ 0")
            if phase.steps is not None and phase.until is not None:
                raise ConfigError(f"phase '{phase.name}': give either steps or until, not both")
        self.phases = [phase if isinstance(phase, Phase) else Phase(**phase) for phase in phases]
        for phase in self.phases:
            if "batch_size" in phase.settings:
                check_batch_size(phase.settings["batch_size"],
                                 f"phase '{phase.name}': settings.batch_size (the per-rank training batch size)")
        self.schedules = [s if isinstance(s, ParamSchedule) else ParamSchedule(**s) for s in (schedules or [])]
        self.check_every = check_every
        self.stop_after_last = stop_after_last
        self.index = 0
        self.phase_start_step = 0
        self.history: list[tuple[str, int]] = []
        self.finished = False

    @property
    def current(self) -> Phase:
        return self.phases[self.index]

    def total_steps(self) -> int | None:
        """Sum of the phases' lengths when every phase has a fixed length."""
        if any(phase.steps is None for phase in self.phases):
            return None
        return sum(phase.steps for phase in self.phases)

    def phase_step(self, global_step: int) -> int:
        return global_step - self.phase_start_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, PhaseDriven):
            raise ConfigError(f"PhaseSchedule drives an effsr SRModule; got {type(pl_module).__name__}")
        total = self.total_steps()
        if stage == "fit" and total is not None and trainer.max_steps == -1:
            trainer.fit_loop.epoch_loop.max_steps = total
        if stage == "fit":
            datamodule = getattr(trainer, "datamodule", None)
            for phase in self.phases:
                if "batch_size" in phase.settings and not isinstance(datamodule, BatchSizeSettable):
                    raise ConfigError(
                        f"phase '{phase.name}': settings.batch_size needs a data module with set_batch_size "
                        f"(effsr's SRDataModule, `data:` in the config), got {type(datamodule).__name__}"
                    )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.finished:  # resumed from the final checkpoint of a finished pipeline: nothing left to train
            if self.stop_after_last:
                trainer.should_stop = True
            return
        module = _driven(pl_module)
        if module.phase_name != self.current.name:
            self._enter(trainer, pl_module, self.index, trainer.global_step)
        else:  # resumed inside the phase: the module restored it from the checkpoint
            module.on_phase_resumed(self.current.name, dict(self.current.settings))
        self._advance_while_due(trainer, pl_module)
        self._apply_batch_size(trainer)  # also on a resume inside a phase (no _enter then)
        self._push_schedules(trainer, pl_module, log=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._push_schedules(trainer, pl_module)
        pl_module.log("phase/index", float(self.index), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("phase/step", float(self.phase_step(trainer.global_step)), on_step=True, on_epoch=False,
                      batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.finished:
            self._advance_while_due(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "phase_start_step": self.phase_start_step, "history": list(self.history),
                "finished": self.finished, "names": [phase.name for phase in self.phases]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = [phase.name for phase in self.phases]
        done = state_dict["index"] + 1
        if state_dict.get("names") and state_dict["names"][:done] != names[:done]:
            raise ConfigError(
                f"the checkpoint was written by a pipeline with phases {state_dict['names']}, "
                f"this config has {names}; resume with the config that wrote it."
            )
        self.index = int(state_dict["index"])
        self.phase_start_step = int(state_dict["phase_start_step"])
        self.history = [tuple(item) for item in state_dict.get("history", [])]
        self.finished = bool(state_dict.get("finished", False))

    def _due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        phase = self.current
        local = self.phase_step(trainer.global_step)
        if phase.steps is not None:
            return local >= phase.steps
        if phase.until is None:
            return False
        if phase.max_steps is not None and local >= phase.max_steps:
            return True
        if local == 0 or local % self.check_every:
            return False
        reached = bool(_driven(pl_module).phase_condition(phase.until)) if trainer.is_global_zero else False
        return bool(trainer.strategy.broadcast(reached, src=0))

    def _advance_while_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self._due(trainer, pl_module):
            if self.index + 1 >= len(self.phases):
                self.finished = True
                if self.stop_after_last:
                    rank_zero_info(f"[effsr] pipeline finished after phase '{self.current.name}' "
                                   f"at step {trainer.global_step}")
                    trainer.should_stop = True
                return
            self._enter(trainer, pl_module, self.index + 1, trainer.global_step)

    def _enter(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, global_step: int) -> None:
        self.index = index
        self.phase_start_step = global_step
        phase = self.current
        self.history.append((phase.name, global_step))
        length = f"{phase.steps} steps" if phase.steps is not None else (
            f"until {phase.until}" if phase.until else "until the end")
        rank_zero_info(f"[effsr] phase {index + 1}/{len(self.phases)} '{phase.name}' starts at step "
                       f"{global_step} ({length})")
        self._apply_batch_size(trainer)
        module = _driven(pl_module)
        if module.enter_phase(phase.name, dict(phase.settings)):
            settings = module.phase_settings  # the module may default the key
            rebuild_training_setup(trainer, keep_optimizer_state=bool(settings.get("keep_optimizer_state", False)))

    def _apply_batch_size(self, trainer: L.Trainer) -> None:
        """The current phase's ``batch_size`` setting, or ``data.batch_size`` when it has none."""
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, BatchSizeSettable):
            return
        phase = self.current
        size = phase.settings.get("batch_size", datamodule.batch_size)
        if size is None:
            return
        if datamodule.train_batch_size != size:
            rank_zero_info(f"[effsr] phase '{phase.name}': training batch size {size} per rank")
        datamodule.set_batch_size(size)

    def _push_schedules(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        for schedule in self.schedules:
            if schedule.phase is not None and schedule.phase != self.current.name:
                continue
            step = self.phase_step(trainer.global_step) if schedule.phase else trainer.global_step
            value = schedule.value(step)
            _driven(pl_module).set_schedule_value(schedule.name, value)
            if log:
                pl_module.log(f"schedule/{schedule.name}", value, on_step=True, on_epoch=False,
                              batch_size=1)


def _driven(pl_module: L.LightningModule) -> PhaseDriven:
    """The module as the PhaseSchedule sees it (``setup`` checked that it is one)."""
    if not isinstance(pl_module, PhaseDriven):
        raise ConfigError(f"PhaseSchedule drives an effsr SRModule; got {type(pl_module).__name__}")
    return pl_module


def rebuild_training_setup(trainer: L.Trainer, keep_optimizer_state: bool = False) -> None:
    """Re-creates optimizers/LR schedulers and, under DDP, the DistributedDataParallel wrapper.

    Needed whenever the set of trainable parameters or the architecture changed: DDP's reducer holds
    the parameters it wrapped, and optimizer state of removed parameters must not leak into a new phase.
    With ``keep_optimizer_state`` (phase setting) the per-parameter state (e.g. Adam's moments and step) of
    parameters that are still trained moves to the new optimizer, as if one optimizer ran through the phases.
    """
    strategy = trainer.strategy
    previous = {parameter: state for optimizer in strategy.optimizers for parameter, state in optimizer.state.items()}
    if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    if keep_optimizer_state:
        for optimizer in strategy.optimizers:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    state = previous.get(parameter)
                    if state is not None and all(value.shape == parameter.shape for value in state.values()
                                                 if isinstance(value, Tensor) and value.dim() > 0):
                        optimizer.state[parameter] = state
    _optimizers_to_device(strategy.optimizers, strategy.root_device)


class PhaseProgressBar(TQDMProgressBar):
    """The default progress bar plus the current phase and its local step."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("phase/index", None)
        metrics.pop("phase/step", None)
        for callback in trainer.callbacks:
            if isinstance(callback, PhaseSchedule):
                metrics["phase"] = f"{callback.current.name}:{callback.phase_step(trainer.global_step)}"
        return metrics
