"""SRModule: the LightningModule every effsr method subclasses.

It owns what all methods share: uint8 → float normalisation on the device, the pixel range of the network,
L1 training, per-set validation/test metrics (Y-PSNR/SSIM and RGB PSNR, paper protocol) and per-set measured
cost (:mod:`effsr.models.evaluation`), cost logging, sample images, tiled inference for large inputs, test
results as JSON and console summaries (:mod:`effsr.models.results`), and the phase hooks the
:class:`effsr.phases.PhaseSchedule` callback drives. Methods override the small hooks documented in
``docs/design.md`` (``training_loss``, ``infer``, ``on_phase_start``, ...), never the Lightning hooks: those are
``@final`` here and call the method hooks (``on_eval_start/end``, ``after_optimizer_step``, ``adjust_optimizer``,
``build_lr_scheduler``, ``on_checkpoint_loaded``, ``on_fit_begin``, ``on_fit_finished``, ``on_phase_resumed``) at
fixed points, so a
method cannot forget a ``super()`` call or run its part in the wrong order (``tests/test_contract.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, final

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from effsr.cost import count_params, meta_macs_720p
from effsr.errors import ConfigError, TrainingError
from effsr.inference.tiling import tiled_forward
from effsr.loggers import log_image
from effsr.models.evaluation import EvaluationMixin

__all__ = ["SRModule", "log_image"]  # log_image: methods import it from here


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999))


class SRModule(EvaluationMixin, L.LightningModule):
    """Trains and evaluates one SR network.

    Args:
        network: the plain SR network (``scale`` and ``pixel_range`` attributes; I/O in [0, pixel_range]).
        optimizer: optimizer factory (LightningCLI: ``class_path``/``init_args``); default Adam(2e-4, β=(0.9, 0.999)).
        lr_scheduler: LR scheduler factory, stepped every optimizer step (SR papers count iterations).
        tile_above_pixels: LR images with more pixels than this are processed in overlapping tiles
            (bounded memory for 2K–8K inputs); set 0 to always tile, -1 to never tile.
        tile_size: LR tile size for tiled inference.
        tile_overlap: LR overlap between tiles (≥ the network's receptive radius keeps tiles exact).
        log_images: number of validation images per set whose LR/bicubic/SR/HR crops are logged.
        results_dir: where ``effsr test`` writes ``test_results.json`` (default: the trainer's root dir).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        tile_above_pixels: int = 1024 * 1024,
        tile_size: int = 256,
        tile_overlap: int = 16,
        log_images: int = 1,
        results_dir: str | None = None,
    ) -> None:
        super().__init__()
        for attribute in ("scale", "pixel_range"):
            if not hasattr(network, attribute):
                raise ConfigError(
                    f"model.network ({type(network).__name__}) has no `{attribute}` attribute; effsr networks "
                    "take `scale` and `pixel_range` arguments (see docs/design.md)."
                )
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tile_above_pixels = tile_above_pixels
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.log_images = log_images
        self.results_dir = results_dir
        self.phase_name: str | None = None
        self.phase_settings: dict[str, Any] = {}
        self.schedule_values: dict[str, float] = {}
        self._cost_cache: dict[str, float] | None = None
        self._set_up = False
        self._init_evaluation()

    @property
    def scale(self) -> int:
        return int(self.network.scale)

    @property
    def pixel_range(self) -> float:
        return float(self.network.pixel_range)

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch; ``lr``/``hr`` are in the network's pixel range. Default: L1."""
        loss = F.l1_loss(self.network(lr), hr)
        return loss, {"l1": loss.detach()}

    def infer(self, lr: Tensor) -> Tensor:
        """Inference path used by validation/test/predict (pixel range in and out)."""
        return self.network(lr)

    def parameters_to_train(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer gets in the current phase: parameters with ``requires_grad``."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        """Called when a phase begins. Return True when the trainable set or architecture changed."""
        return "trainable" in settings

    def phase_condition(self, name: str) -> bool:
        """Whether the condition ``name`` that ends an ``until`` phase holds."""
        raise ConfigError(
            f"{type(self).__name__} reports no phase condition '{name}'; check `until:` in the PhaseSchedule config."
        )

    def set_schedule_value(self, name: str, value: float) -> None:
        """Receives a continuous schedule's value (e.g. Gumbel tau) every step."""
        self.schedule_values[name] = value

    def structure_state(self) -> dict[str, Any]:
        """Structural state (pruning plan, frozen patterns, splits) saved with the checkpoint."""
        return {}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        """Re-applies :meth:`structure_state` before the state dict is loaded."""

    def on_setup(self, stage: str) -> None:
        """Once per module, when its first run (fit/validate/test/predict) is set up, before Lightning restores
        ``--ckpt_path``: load the weights a method starts from (``dense_checkpoint``, reference or member files)
        here, never in ``__init__``, so every config instantiates without its files existing. ``effsr profile``
        calls it when no checkpoint is profiled (``stage="profile"``)."""

    def on_checkpoint_loaded(self, checkpoint: dict[str, Any]) -> None:
        """After every checkpoint load (also one without effsr state, e.g. converted official weights): the
        structure, phase, schedule values and the phase's ``trainable`` set are restored; Lightning loads the
        tensors right after. For checks of the checkpoint against the config and method-specific state."""

    def on_fit_begin(self) -> None:
        """At the start of every fit, after the PhaseSchedule entered (or resumed) its phase."""

    def on_fit_finished(self) -> None:
        """At the end of every fit (its last step and validation done): end-of-run checks and reports."""

    def on_phase_resumed(self, name: str, settings: dict[str, Any]) -> None:
        """A fit resumes from a checkpoint inside phase ``name`` (:meth:`on_phase_start` is not called again);
        called by the PhaseSchedule before :meth:`on_fit_begin`."""

    def after_optimizer_step(self) -> None:
        """After each training batch, its optimizer step done (``global_step`` counts it, the PhaseSchedule has
        advanced): per-step bookkeeping such as dropping caches of the weights or step logs."""

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        """The LR scheduler of the current phase, stepped every optimizer step. Default: ``model.lr_scheduler``
        of the config (None without one)."""
        return None if self.lr_scheduler_factory is None else self.lr_scheduler_factory(optimizer)

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Changes the phase's optimizer in place (e.g. a parameter group's lr) after it and its LR scheduler
        were built and the phase's ``lr`` was applied to every group."""

    def deployed_network(self) -> nn.Module:
        """The network as it will be deployed (compact, sparse, routed) for cost counting and profiling."""
        return self.network

    def cost_report(self) -> dict[str, float]:
        """Cost of the deployed model: params and MACs for a 1280×720 output (docs/protocol.md).

        Dense networks are counted on a meta-device copy (shapes only, no compute); methods whose cost
        depends on the data (sparse, routed execution) override this with what they measured.
        """
        network = self.deployed_network()
        return {"params": float(count_params(network)), "macs_720p": float(meta_macs_720p(network, self.scale))}

    def enter_phase(self, name: str, settings: dict[str, Any]) -> bool:
        """Applies a phase's generic settings, then the method's :meth:`on_phase_start`."""
        self.phase_name = name
        self.phase_settings = dict(settings)
        self._cost_cache = None
        changed = self._apply_trainable(settings)
        changed = self.on_phase_start(name, self.phase_settings) or changed
        return bool(changed or settings.get("rebuild_optimizer", False) or "lr" in settings)

    def _apply_trainable(self, settings: dict[str, Any]) -> bool:
        prefixes = settings.get("trainable")
        if prefixes is None:
            return False
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        names = [name for name, _ in self.named_parameters()]
        for prefix in prefixes:
            if prefix != "all" and not any(name.startswith(prefix) for name in names):
                raise ConfigError(
                    f"phase '{self.phase_name}': trainable prefix '{prefix}' matches no parameter; "
                    f"parameters start with e.g. {sorted({n.split('.')[0] + '.' + n.split('.')[1] for n in names})[:8]}"
                )
        for name, parameter in self.named_parameters():
            parameter.requires_grad_("all" in prefixes or any(name.startswith(prefix) for prefix in prefixes))
        return True

    @final
    def setup(self, stage: str) -> None:
        if not self._set_up:  # a later run of the same module (fit, then test) must not reload the start weights
            self._set_up = True
            self.on_setup(stage)

    @final
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 images travel through the loader; they become float [0, 1] on the device."""
        for key in ("lr", "hr"):
            if key in batch and batch[key].dtype == torch.uint8:
                batch[key] = batch[key].float().div_(255.0)
        return batch

    @final
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        lr, hr = batch["lr"] * self.pixel_range, batch["hr"] * self.pixel_range
        loss, logs = self.training_loss(lr, hr, batch)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}"
                f"{f' in phase {self.phase_name!r}' if self.phase_name else ''}. Nothing was saved from this step; "
                "resume from the last checkpoint with `--ckpt_path last` after lowering the learning rate "
                "(model.init_args.optimizer.init_args.lr) or checking the training images."
            )
        batch_size = lr.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=batch_size)
        return loss

    @final
    def configure_optimizers(self) -> Any:
        parameters = self.parameters_to_train()
        if not parameters:
            raise ConfigError(
                f"no trainable parameters in phase {self.phase_name!r}; check the phase's `trainable` setting."
            )
        optimizer = self.optimizer_factory(parameters)
        if "lr" in self.phase_settings:
            for group in optimizer.param_groups:
                group["lr"] = float(self.phase_settings["lr"])
                group["initial_lr"] = float(self.phase_settings["lr"])
        scheduler = self.build_lr_scheduler(optimizer)
        self.adjust_optimizer(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @final
    def on_train_start(self) -> None:
        self.on_fit_begin()

    @final
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after_optimizer_step()

    @final
    def on_train_end(self) -> None:
        self.on_fit_finished()

    @final
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["effsr"] = {
            "phase_name": self.phase_name,
            "phase_settings": self.phase_settings,
            "schedule_values": self.schedule_values,
            "structure": self.structure_state(),
        }

    @final
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("effsr")
        if state:
            self._restore_effsr_state(state)
        self.on_checkpoint_loaded(checkpoint)

    def _restore_effsr_state(self, state: dict[str, Any]) -> None:
        """Structure first (so the tensors fit), then the phase, its trainable set and the schedule values."""
        self.rebuild_structure(state.get("structure", {}))
        self.phase_name = state.get("phase_name")
        self.phase_settings = dict(state.get("phase_settings") or {})
        self.schedule_values = dict(state.get("schedule_values") or {})
        self._apply_trainable(self.phase_settings)
        for name, value in self.schedule_values.items():
            self.set_schedule_value(name, value)
        self._cost_cache = None

    def super_resolve(self, lr: Tensor) -> Tensor:
        """LR in [0, 1] → SR in [0, 1] through :meth:`infer`, tiled when the image is large."""
        scaled = lr * self.pixel_range
        pixels = lr.shape[-2] * lr.shape[-1]
        if self.tile_above_pixels >= 0 and pixels > self.tile_above_pixels:
            sr = tiled_forward(
                scaled, self.infer, self.scale, patch_size=self.tile_size, overlap=self.tile_overlap, batch_size=4
            )
        else:
            sr = self.infer(scaled)
        return (sr / self.pixel_range).clamp_(0.0, 1.0)

    def forward(self, lr: Tensor) -> Tensor:
        return self.super_resolve(lr)

    @final
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        sr = self.super_resolve(batch["lr"])
        return {"sr": sr, "name": batch.get("name", [f"{batch_idx:06d}"])}
