"""A toy 3-phase pipeline (freeze part → change architecture → finetune) for the PhaseSchedule tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from effsr.models import SRModule


class ShrinkableSR(nn.Module):
    """head → ReLU → body → ReLU → tail → PixelShuffle; ``shrink`` physically removes body channels."""

    def __init__(self, scale: int, width: int = 16, pixel_range: float = 1.0) -> None:
        super().__init__()
        self.scale, self.pixel_range = scale, pixel_range
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.tail = nn.Conv2d(width, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.tail(torch.relu(self.body(torch.relu(self.head(x))))))

    @torch.no_grad()
    def shrink(self, kept: list[int]) -> None:
        index = torch.tensor(kept, dtype=torch.long)
        body = nn.Conv2d(self.body.in_channels, len(kept), 3, padding=1)
        body.weight.copy_(self.body.weight[index])
        body.bias.copy_(self.body.bias[index])
        tail = nn.Conv2d(len(kept), self.tail.out_channels, 3, padding=1)
        tail.weight.copy_(self.tail.weight[:, index])
        tail.bias.copy_(self.tail.bias)
        self.body, self.tail = body, tail


class ToyPhaseModule(SRModule):
    """Phase setting ``shrink: K`` keeps the K body filters of largest L1 norm (an architecture change)."""

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.kept: list[int] | None = None

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        if "shrink" in settings and self.kept is None:
            norms = self.network.body.weight.detach().abs().sum(dim=(1, 2, 3))
            self.kept = sorted(torch.argsort(norms, descending=True)[: int(settings["shrink"])].tolist())
            self.network.shrink(self.kept)
            return True
        return False

    def structure_state(self) -> dict[str, Any]:
        return {"kept": self.kept}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        if state.get("kept") is not None and self.kept is None:
            self.kept = list(state["kept"])
            self.network.shrink(self.kept)


class PhaseRecorder(L.Callback):
    """Writes, per step, the phase, the trainable parameter names, shapes and checksums to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.records.append({
            "step": trainer.global_step,
            "phase": pl_module.phase_name,
            "trainable": sorted(n for n, p in pl_module.network.named_parameters() if p.requires_grad),
            "optimized": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "body_out": pl_module.network.body.out_channels,
            "sums": {n: float(p.detach().double().sum()) for n, p in pl_module.network.named_parameters()},
        })

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.records))


class KillAtStep(L.Callback):
    """Simulates a crash: raises once training reaches ``step`` (after the checkpoints written before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated kill at step {trainer.global_step}")


class BatchSizeRecorder(L.Callback):
    """Writes ``[[global_step, batch size the module receives], ...]`` to a JSON file after every batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.records: list[list[int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.records.append([trainer.global_step, int(batch["lr"].shape[0]), int(batch["hr"].shape[0])])
        self.path.write_text(json.dumps(self.records))
