"""The SRModule contract: methods fill SRModule's hooks, never Lightning's, and SRModule calls them at fixed points.

Lightning hooks of SRModule are ``@final``; a method class that defines one would bypass the order SRModule
guarantees (records reset before ``on_eval_start``, results computed before ``on_eval_end``, structure restored
before ``on_checkpoint_loaded``...). The call points are checked by calling SRModule's Lightning hooks directly
and, once, through a real 2-phase fit that is resumed mid-phase.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.core import hooks as lightning_hooks
from torch import nn

import effsr.methods
from effsr.checkpointing import EpochEndCheckpoint
from effsr.data import SRDataModule
from effsr.models import SRModule
from effsr.phases import Phase, PhaseDriven, PhaseSchedule

# Lightning's hooks: every public method of its hook mixins, plus the steps and optimizer plumbing of
# LightningModule that a subclass could override.
LIGHTNING_HOOKS = frozenset(
    name
    for mixin in (lightning_hooks.ModelHooks, lightning_hooks.DataHooks, lightning_hooks.CheckpointHooks)
    for name, value in vars(mixin).items()
    if callable(value) and not name.startswith("_")
) | {
    "training_step", "validation_step", "test_step", "predict_step", "forward", "configure_optimizers",
    "optimizer_step", "optimizer_zero_grad", "lr_scheduler_step", "backward", "configure_callbacks",
    "configure_gradient_clipping",
}


def _method_classes() -> list[type]:
    """Every LightningModule subclass defined in a module of effsr.methods (packages walked recursively)."""
    for info in pkgutil.walk_packages(effsr.methods.__path__, prefix="effsr.methods."):
        importlib.import_module(info.name)
    found: dict[str, type] = {}
    for name, module in list(importlib.sys.modules.items()):
        if not name.startswith("effsr.methods") or module is None:
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, L.LightningModule) and cls.__module__ == name:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]


def _params() -> list[Any]:
    return [
        pytest.param(cls, id=cls.__qualname__) for cls in _method_classes()
    ]


@pytest.mark.unit
def test_method_classes_are_found() -> None:
    names = {cls.__qualname__ for cls in _method_classes()}
    assert {"ASSLModule", "SMSRModule", "ClassSRModule", "NMSparsityModule"} <= names


@pytest.mark.unit
@pytest.mark.parametrize("cls", _params())
def test_no_method_class_defines_a_lightning_hook(cls: type) -> None:
    own = sorted(name for klass in cls.__mro__ if klass.__module__.startswith("effsr.methods")
                 for name in vars(klass) if name in LIGHTNING_HOOKS)
    assert not own, (f"{cls.__qualname__} overrides Lightning hook(s) {own}; use SRModule's hooks instead "
                     "(on_eval_start/on_eval_end, after_optimizer_step, build_lr_scheduler/adjust_optimizer, "
                     "on_checkpoint_loaded, on_fit_begin, on_fit_finished, on_phase_resumed; docs/design.md)")


@pytest.mark.unit
def test_srmodule_lightning_hooks_are_final() -> None:
    defined = [name for klass in SRModule.__mro__ if klass.__module__.startswith("effsr.models")
               for name in vars(klass) if name in LIGHTNING_HOOKS and name != "forward"]
    assert {"training_step", "validation_step", "configure_optimizers", "on_load_checkpoint"} <= set(defined)
    not_final = [name for name in defined if not getattr(getattr(SRModule, name), "__final__", False)]
    assert not not_final


# ---------------------------------------------------------------------------- call points
class _Net(nn.Module):
    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale, self.pixel_range = scale, 1.0
        self.conv = nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        self.extra = nn.Conv2d(3, 3, 1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x + 0 * self.extra(x)))


class Recorder(SRModule):
    """Records every method hook call (name, argument, what SRModule had restored/computed at that point)."""

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.calls: list[tuple[Any, ...]] = []
        self.structure: dict[str, Any] = {}

    def structure_state(self) -> dict[str, Any]:
        return {"marker": 7}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        self.structure = dict(state)
        self.calls.append(("rebuild_structure",))

    def parameters_to_train(self) -> list[dict[str, Any]]:
        return [{"params": list(self.network.conv.parameters()), "name": "conv"},
                {"params": list(self.network.extra.parameters()), "name": "extra"}]

    def on_setup(self, stage: str) -> None:
        self.calls.append(("on_setup", stage, self.global_step))

    def on_eval_start(self, stage: str) -> None:
        self.calls.append(("on_eval_start", stage, len(self._eval_records), self._trainer is not None
                           and self.trainer.sanity_checking))

    def on_eval_end(self, stage: str) -> None:
        self.calls.append(("on_eval_end", stage, sorted(self.eval_results)))

    def after_optimizer_step(self) -> None:
        self.calls.append(("after_optimizer_step", self.global_step))

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        self.calls.append(("build_lr_scheduler", [group["lr"] for group in optimizer.param_groups]))
        return super().build_lr_scheduler(optimizer)

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append(("adjust_optimizer",))
        optimizer.param_groups[1]["lr"] = 0.5

    def on_checkpoint_loaded(self, checkpoint: dict[str, Any]) -> None:
        self.calls.append(("on_checkpoint_loaded", self.phase_name, dict(self.structure)))

    def on_fit_begin(self) -> None:
        self.calls.append(("on_fit_begin", self.phase_name))

    def on_fit_finished(self) -> None:
        self.calls.append(("on_fit_finished", self.phase_name, self.global_step))

    def on_phase_resumed(self, name: str, settings: dict[str, Any]) -> None:
        self.calls.append(("on_phase_resumed", name, dict(settings)))

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        self.calls.append(("on_phase_start", name))
        return super().on_phase_start(name, settings)


def _names(calls: list[tuple[Any, ...]]) -> list[str]:
    return [call[0] for call in calls]


@pytest.mark.unit
def test_configure_optimizers_builds_scheduler_then_adjusts() -> None:
    module = Recorder(_Net(), lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 10))
    module.phase_settings = {"lr": 0.01}
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    assert module.calls == [("build_lr_scheduler", [0.01, 0.01]), ("adjust_optimizer",)]
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.5]
    assert isinstance(configured["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert configured["lr_scheduler"]["interval"] == "step"
    plain = Recorder(_Net())
    assert isinstance(plain.configure_optimizers(), torch.optim.Adam)  # no scheduler: the optimizer alone


@pytest.mark.unit
def test_checkpoint_loaded_after_structure_and_phase_also_without_effsr_state() -> None:
    source = Recorder(_Net())
    source.phase_name, source.phase_settings = "second", {"trainable": ["network.conv"]}
    checkpoint: dict[str, Any] = {}
    source.on_save_checkpoint(checkpoint)
    target = Recorder(_Net())
    target.on_load_checkpoint(checkpoint)
    assert target.calls == [("rebuild_structure",), ("on_checkpoint_loaded", "second", {"marker": 7})]
    assert [p.requires_grad for p in target.network.extra.parameters()] == [False, False]
    converted = Recorder(_Net())
    converted.on_load_checkpoint({"state_dict": {}})  # e.g. converted official weights: no effsr state
    assert converted.calls == [("on_checkpoint_loaded", None, {})]


@pytest.mark.unit
def test_fit_begin_and_after_optimizer_step_call_points() -> None:
    module = Recorder(_Net())
    module.on_train_start()
    module.on_train_batch_end(None, None, 0)
    assert _names(module.calls) == ["on_fit_begin", "after_optimizer_step"]


def _lifecycle(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The calls without the optimizer/structure ones (checked by the unit tests above)."""
    return [call for call in calls if call[0] not in ("build_lr_scheduler", "adjust_optimizer", "rebuild_structure")]


def _fit(module: Recorder, root: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    data = SRDataModule(scale=2, train="sample", val_sets=["sample"], lr_patch_size=8, batch_size=2,
                        samples_per_epoch=6, num_workers=0)
    schedule = PhaseSchedule([Phase("first", 2, settings={"trainable": ["network.conv"]}), Phase("second", 4)])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1, limit_val_batches=1,
                        default_root_dir=str(root), use_distributed_sampler=False,
                        callbacks=[schedule, EpochEndCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.integration
def test_hooks_in_a_fit_and_a_resume_inside_a_phase(tmp_path: Path) -> None:
    """3 steps per epoch: sanity check, phase 'first' (2 steps), 'second' entered at step 2, validation after the
    epoch; the resume from the epoch-end checkpoint (step 3, inside 'second') reports the phase as resumed."""
    first = Recorder(_Net())
    assert isinstance(first, PhaseDriven)
    _fit(first, tmp_path, max_steps=3)
    first.calls = _lifecycle(first.calls)
    assert first.calls.pop(0) == ("on_setup", "fit", 0)
    names = _names(first.calls)
    assert first.calls[0] == ("on_eval_start", "val", 0, True)  # the sanity check: start, but no on_eval_end
    # the PhaseSchedule advances at the end of step 2 before after_optimizer_step of that step
    assert names[1:6] == ["on_phase_start", "on_fit_begin", "after_optimizer_step", "on_phase_start",
                          "after_optimizer_step"]
    assert first.calls[2] == ("on_fit_begin", "first") and first.calls[4] == ("on_phase_start", "second")
    steps = [call[1] for call in first.calls if call[0] == "after_optimizer_step"]
    assert steps == [1, 2, 3]
    ends = [call for call in first.calls if call[0] == "on_eval_end"]
    assert ends == [("on_eval_end", "val", ["sample"])]
    assert names.index("on_eval_end") > names.index("on_eval_start", 1)
    assert "on_phase_resumed" not in names
    assert names.count("on_fit_finished") == 1 and first.calls[-1] == ("on_fit_finished", "second", 3)

    resumed = Recorder(_Net())
    _fit(resumed, tmp_path, max_steps=4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    resumed.calls = _lifecycle(resumed.calls)
    names = _names(resumed.calls)
    assert names.index("on_setup") < names.index("on_checkpoint_loaded")  # start weights, then the checkpoint
    assert resumed.calls[names.index("on_checkpoint_loaded")] == ("on_checkpoint_loaded", "second", {"marker": 7})
    assert resumed.calls[names.index("on_phase_resumed")] == ("on_phase_resumed", "second", {})
    assert names.index("on_checkpoint_loaded") < names.index("on_phase_resumed") < names.index("on_fit_begin")
    assert "on_phase_start" not in names
    assert [call[1] for call in resumed.calls if call[0] == "after_optimizer_step"] == [4]
    resumed.setup("test")  # a later run of the same module does not reload its start weights
    assert names.count("on_setup") == 1 and _names(resumed.calls).count("on_setup") == 1


@pytest.mark.unit
def test_assl_instantiates_without_its_dense_checkpoint_and_loads_it_at_setup(tmp_path: Path) -> None:
    """No I/O in __init__: the config builds without the file; on_setup loads it (safe loader), once."""
    from effsr.archs import LEDSR
    from effsr.errors import CheckpointError
    from effsr.methods.assl import ASSLModule

    missing = ASSLModule(LEDSR(2, num_features=8, num_blocks=1), dense_checkpoint=str(tmp_path / "dense.ckpt"))
    with pytest.raises(CheckpointError, match=r"dense_checkpoint '.*dense.ckpt' does not exist"):
        missing.setup("fit")
    torch.manual_seed(1)
    source = LEDSR(2, num_features=8, num_blocks=1)
    torch.save({"state_dict": {f"network.{key}": value for key, value in source.state_dict().items()}},
               tmp_path / "dense.ckpt")
    module = ASSLModule(LEDSR(2, num_features=8, num_blocks=1), dense_checkpoint=str(tmp_path / "dense.ckpt"))
    assert not torch.equal(module.network.head.weight, source.head.weight)
    module.setup("fit")
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in module.network.state_dict().items())


# ---------------------------------------------------------------------------- one module per concern
# files still importing wandb themselves until their owners switch to effsr.loggers (issue 13 §2)
KNOWN_WANDB_IMPORTS: set[str] = set()


@pytest.mark.unit
def test_only_effsr_loggers_imports_wandb() -> None:
    """W&B-specific code lives in effsr/loggers.py; everything else describes what to log through it."""
    package = Path(effsr.methods.__file__).parents[1]
    importing = {
        str(path.relative_to(package.parent)) for path in package.rglob("*.py")
        if any(line.strip().startswith(("import wandb", "from wandb")) for line in path.read_text().splitlines())
    }
    assert importing - KNOWN_WANDB_IMPORTS == {"effsr/loggers.py"}
