"""Writes SR images produced by ``effsr predict`` as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from effsr.data.io import write_image


class SRImageWriter(BasePredictionWriter):
    """Saves each predicted SR image as ``<output_dir>/<name>.png`` (uint8 RGB, written atomically)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        images = prediction["sr"].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for image, name in zip(images, prediction["name"], strict=True):
            write_image(self.output_dir / f"{Path(name).stem}.png", image)
