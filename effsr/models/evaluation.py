"""Per-image records of one evaluation and their per-set reduction (metrics, measured cost), over all ranks.

:class:`SRModule` keeps one :class:`EvalRecords` per validation/test run: every evaluated image adds one
record (its set, name, Y-PSNR/SSIM and the method's per-image measured values, see
:meth:`effsr.models.SRModule.image_measurements`). At the end of the run the records of all DDP ranks are
gathered (each image was evaluated on exactly one rank, ``EvalSampler``) and grouped per set in name order,
so a set's numbers come from that set's images only, do not depend on the number of ranks, and start
empty in every run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, final, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.distributed import all_gather_objects
from effsr.errors import ConfigError
from effsr.loggers import log_image
from effsr.metrics import PSNR, SSIM
from effsr.metrics import psnr as psnr_fn
from effsr.metrics import ssim as ssim_fn
from effsr.models.results import (
    HISTORY,
    console_print,
    format_results_table,
    format_val_summary,
    write_test_results,
)

Value = float | list[float]


@runtime_checkable
class NamedEvalSets(Protocol):
    """A data module whose k-th val/test dataloader is the set ``eval_set_names[k]`` (SRDataModule)."""

    eval_set_names: list[str]


@dataclass
class ImageRecord:
    """One evaluated image: its set, name, per-image metrics and the method's measured values."""

    set_name: str
    name: str
    psnr_y: float
    ssim_y: float
    measured: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The image's entry under ``images`` in ``test_results.json``."""
        return {"psnr_y": self.psnr_y, "ssim_y": self.ssim_y, **self.measured}


class EvalRecords:
    """The records of one evaluation on this rank; :meth:`gather` returns every rank's, grouped per set."""

    def __init__(self) -> None:
        self.records: list[ImageRecord] = []

    def add(self, record: ImageRecord) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def gather(self, set_names: Sequence[str]) -> dict[str, list[ImageRecord]]:
        """Records of all ranks per set (``set_names`` order, every set present, images sorted by name).

        Every rank must call this (a collective under DDP), also a rank that saw no image.
        """
        records = [record for part in all_gather_objects(list(self.records)) for record in (part or [])]
        grouped: dict[str, list[ImageRecord]] = {name: [] for name in set_names}
        for record in records:
            grouped.setdefault(record.set_name, []).append(record)
        return {name: sorted(items, key=lambda record: record.name) for name, items in grouped.items()}


def mean_values(images: Sequence[Mapping[str, Any]]) -> dict[str, Value]:
    """Mean of each numeric key over the images that have it (lists element-wise): the default reduction
    of per-image measured values to a set's value."""
    keys: list[str] = []
    for image in images:
        keys += [key for key in image if key not in keys]
    result: dict[str, Value] = {}
    for key in keys:
        values = [image[key] for image in images if key in image]
        if all(isinstance(value, (int, float)) for value in values):
            result[key] = sum(float(value) for value in values) / len(values)
        elif all(isinstance(value, (list, tuple)) for value in values):
            result[key] = [sum(float(item) for item in column) / len(values) for column in zip(*values, strict=True)]
    return result


def scalar_items(key: str, value: Any) -> list[tuple[str, float]]:
    """``(key, float)`` pairs to log for one value: a number as is, a list as ``key_0, key_1, ...``."""
    if isinstance(value, (list, tuple)):
        return [(f"{key}_{index}", float(item)) for index, item in enumerate(value)]
    if isinstance(value, (int, float)):
        return [(key, float(value))]
    return []


class EvaluationMixin:
    """Validation/test of :class:`effsr.models.SRModule`: per-set metrics, measured cost and results.

    Methods plug in through :meth:`on_eval_start`, :meth:`add_measurement` (from ``infer``),
    :meth:`image_measurements`, :meth:`set_measurements`, :meth:`on_eval_measured`, :meth:`on_eval_image` and
    :meth:`on_eval_end`; the Lightning hooks here are ``@final`` (not overridden by methods).
    """

    def _init_evaluation(self) -> None:
        """Evaluation state (called by ``SRModule.__init__``)."""
        self._eval_metrics = nn.ModuleDict()
        self._eval_records = EvalRecords()
        self._images_logged: dict[str, int] = {}
        self._image_measured: dict[str, float] | None = None
        self._results_note = ""
        self.eval_results: dict[str, dict[str, Any]] = {}

    def on_eval_start(self, stage: str) -> None:
        """``stage`` ("val" or "test") starts, also the sanity check; the evaluation's records are already empty."""

    def on_eval_end(self, stage: str) -> None:
        """After every validation/test except the sanity check, once the per-set results are computed, logged
        (and for "test" written): :attr:`eval_results` holds them."""

    def on_eval_image(self, stage: str, set_name: str, name: str, lr: Tensor, sr: Tensor, hr: Tensor) -> None:
        """Per-image hook for method-specific logging (mask images, routing maps); inputs in [0, 1]."""

    def add_measurement(self, **values: float) -> None:
        """Called from :meth:`infer`: adds what was measured (active pixels, patches per branch, MACs) to the
        image being evaluated, summed over the calls of one image (tiles). Ignored outside validation/test."""
        if self._image_measured is not None:
            for key, value in values.items():
                self._image_measured[key] = self._image_measured.get(key, 0.0) + float(value)

    @contextmanager
    def measuring(self) -> Iterator[dict[str, float]]:
        """Collects the :meth:`add_measurement` values of the inference calls inside (one evaluated image)."""
        self._image_measured = measured = {}
        try:
            yield measured
        finally:
            self._image_measured = None

    def image_measurements(self, measured: dict[str, float], sr: Tensor, hr: Tensor) -> dict[str, Any]:
        """Per-image values (numbers or lists) of one evaluated image from its :meth:`add_measurement` sums,
        e.g. ``macs_720p`` at this image's measured density; ``sr``/``hr`` in [0, 1]. They go under the image
        in ``test_results.json`` and :meth:`set_measurements` reduces them per set. Default: as measured."""
        return dict(measured)

    def set_measurements(self, images: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A set's measured values from its images' :meth:`image_measurements` (every rank's images, each once);
        also called with all images of the evaluation. Default: the mean of each key over the images."""
        return mean_values(images)

    def on_eval_measured(self, stage: str, per_set: dict[str, dict[str, Any]], overall: dict[str, Any],
                         n_images: int) -> None:
        """After each evaluation (not the sanity check) with measured values: the per-set and all-images
        :meth:`set_measurements` and the number of images, for a :meth:`cost_report` that reflects the last
        evaluation (``cost/<key>``, ``effsr profile``)."""

    def _set_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(datamodule.eval_set_names or []) if isinstance(datamodule, NamedEvalSets) else []

    def _metrics_for(self, stage: str, set_name: str) -> nn.ModuleDict:
        key = f"{stage}__{set_name}".replace(".", "_")
        if key not in self._eval_metrics:
            metrics = nn.ModuleDict(
                {
                    "psnr_y": PSNR(crop_border=self.scale, y_channel=True),
                    "ssim_y": SSIM(crop_border=self.scale, y_channel=True),
                    "psnr_rgb": PSNR(crop_border=self.scale, y_channel=False),
                }
            ).to(self.device)
            self._eval_metrics[key] = metrics
        return self._eval_metrics[key]

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        names = self._set_names()
        set_name = names[dataloader_idx] if dataloader_idx < len(names) else f"set{dataloader_idx}"
        lr, hr = batch["lr"], batch["hr"]
        with self.measuring() as measured:
            sr = self.super_resolve(lr)
        if sr.shape != hr.shape:
            raise ConfigError(
                f"SR output {tuple(sr.shape)} does not match HR {tuple(hr.shape)} for {batch.get('name')}: "
                f"is data.scale ({getattr(self.trainer.datamodule, 'scale', '?')}) the network's scale ({self.scale})?"
            )
        if measured and lr.shape[0] != 1:
            raise ConfigError(
                f"{type(self).__name__} measures its cost per image: evaluation batches must hold one image "
                f"(got {lr.shape[0]}); SRDataModule's val/test loaders do."
            )
        image_names = list(batch.get("name") or [f"image{len(self._eval_records) + i:05d}" for i in range(len(lr))])
        psnr_values = psnr_fn(sr, hr, crop_border=self.scale, y_channel=True)
        ssim_values = ssim_fn(sr, hr, crop_border=self.scale, y_channel=True)
        metrics = self._metrics_for(stage, set_name)  # Y values computed once, for the metrics and the records
        metrics["psnr_y"].update(sr, hr, scores=psnr_values)
        metrics["ssim_y"].update(sr, hr, scores=ssim_values)
        metrics["psnr_rgb"].update(sr, hr)
        values = self.image_measurements(measured, sr, hr) if lr.shape[0] == 1 else {}
        for index, image_name in enumerate(image_names):
            self._eval_records.add(ImageRecord(set_name, image_name, float(psnr_values[index]),
                                               float(ssim_values[index]), dict(values)))
        self.on_eval_image(stage, set_name, image_names[0], lr, sr, hr)
        if stage == "val" and self._images_logged.get(set_name, 0) < self.log_images and self.global_rank == 0:
            self._images_logged[set_name] = self._images_logged.get(set_name, 0) + 1
            self._log_sample_images(set_name, image_names[0], lr, sr, hr)

    def _start_eval(self) -> None:
        """Every evaluation starts empty: no record, no measured value of an earlier run."""
        self._eval_records = EvalRecords()
        self._images_logged = {}
        self._results_note = ""
        self.eval_results = {}

    @final
    def on_validation_epoch_start(self) -> None:
        self._start_eval()
        self.on_eval_start("val")

    @final
    def on_test_epoch_start(self) -> None:
        self._start_eval()
        self.on_eval_start("test")

    @final
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    @final
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_value(self, key: str, value: Any) -> None:
        for name, item in scalar_items(key, value):
            self.log(name, item, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=1)

    def _finish_eval(self, stage: str) -> dict[str, dict[str, Any]]:
        """Per-set rows of this evaluation (metrics and cost from the set's own images, all ranks), logged.

        Every rank computes every set, also a rank that saw no image of a small set, so the collective calls
        always match under DDP. ``cost/<key>`` is :meth:`cost_report` after :meth:`on_eval_measured`;
        ``cost/<set>/<key>`` the set's measured value of a cost key; other measured keys log as
        ``<stage>/<set>/<key>``.
        """
        metrics: dict[str, dict[str, float]] = {}
        for set_name in self._set_names():
            set_metrics = self._metrics_for(stage, set_name)
            metrics[set_name] = {key: float(metric.compute()) for key, metric in set_metrics.items()}
            for metric in set_metrics.values():
                metric.reset()
        grouped = self._eval_records.gather(list(metrics))
        measured = {name: self.set_measurements([record.measured for record in records])
                    for name, records in grouped.items() if any(record.measured for record in records)}
        every_image = [record.measured for records in grouped.values() for record in records if record.measured]
        sanity = self._sanity_checking()
        if every_image and not sanity:
            self.on_eval_measured(stage, measured, self.set_measurements(every_image), len(every_image))
            self._cost_cache = None
        cost = self._cost()
        results: dict[str, dict[str, Any]] = {}
        for set_name, set_metrics in metrics.items():
            records, set_measured = grouped.get(set_name, []), measured.get(set_name, {})
            results[set_name] = {**set_metrics, "n_images": len(records), **cost, **set_measured,
                                 "images": {record.name: record.as_json() for record in records}}
            for key, value in set_metrics.items():
                self._log_value(f"{stage}/{set_name}/{key}", value)
            for key, value in set_measured.items():
                self._log_value(f"cost/{set_name}/{key}" if key in cost else f"{stage}/{set_name}/{key}", value)
        if not sanity:
            for key, value in cost.items():
                self._log_value(f"cost/{key}", value)
        self.eval_results = {} if sanity else results
        return results

    def _cost(self) -> dict[str, float]:
        if self._cost_cache is None:
            self._cost_cache = {key: float(value) for key, value in self.cost_report().items()
                                if isinstance(value, (int, float))}
        return dict(self._cost_cache)

    def _sanity_checking(self) -> bool:
        return self._trainer is not None and self.trainer.sanity_checking

    @final
    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")
        if not self._sanity_checking():
            self.on_eval_end("val")

    @final
    def on_test_epoch_end(self) -> None:
        results = self.extend_test_results(self._finish_eval("test"))
        self.eval_results = results
        if self.global_rank == 0:
            self._write_results(results)
        self.on_eval_end("test")

    def _write_results(self, results: dict[str, Any]) -> Path:
        """``test_results.json`` under ``results_dir`` (default: the trainer's root dir), earlier ones kept."""
        path, kept = write_test_results(Path(self.results_dir or self.trainer.default_root_dir), results)
        self._results_note = f"test results written to {path}" + (
            f" (earlier results kept in {HISTORY}/)" if kept else "")
        return path

    @final
    def on_validation_end(self) -> None:
        """One line per validation during fit; a table for ``effsr validate`` (rank 0, fresh line)."""
        if not self.eval_results:
            return
        if self.trainer.state.fn == "fit":
            console_print(self.trainer, format_val_summary(self.global_step, self.eval_results))
        else:
            console_print(self.trainer, format_results_table(f"validation ({type(self).__name__}, step "
                                                             f"{self.global_step})", self.eval_results))

    @final
    def on_test_end(self) -> None:
        """The test table, printed after the progress bar has closed its line."""
        if self.eval_results:
            table = format_results_table(f"test ({type(self).__name__}, step {self.global_step})", self.eval_results)
            console_print(self.trainer, table + (f"\n{self._results_note}" if self._results_note else ""))

    def extend_test_results(self, results: dict[str, Any]) -> dict[str, Any]:
        """Lets a method add its own per-set entries to the JSON (measured values are already there)."""
        return results

    def _log_sample_images(self, set_name: str, name: str, lr: Tensor, sr: Tensor, hr: Tensor) -> None:
        """LR (nearest) / bicubic / SR / HR side by side, a centre crop, to whatever logger is attached."""
        logger = self.logger
        if logger is None:
            return
        crop = 192
        height, width = hr.shape[-2:]
        top, left = max(0, (height - crop) // 2), max(0, (width - crop) // 2)
        top, left = top - top % self.scale, left - left % self.scale
        window = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
        lr_up = F.interpolate(lr, scale_factor=self.scale, mode="nearest")
        bicubic = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        panels = [image[window][0] for image in (lr_up, bicubic, sr, hr)]
        strip = torch.cat(panels, dim=-1)
        array = (strip.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        log_image(logger, f"val_images/{set_name}", array, caption=f"{name}: LR | bicubic | SR | HR",
                  step=self.global_step)

