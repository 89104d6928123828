"""ClassSR's split of the training sub-images into classes by the PSNR a model reaches on them."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from effsr.distributed import all_gather_objects, broadcast_object, rank
from effsr.errors import ConfigError
from effsr.methods.classsr.checkpoints import load_split_model
from effsr.metrics import psnr as psnr_fn
from effsr.models.base import log_image

SPLIT_VERSION = 2  # 2: the key hashes the arrays' content instead of their cache file names


@runtime_checkable
class TrainSubsetSettable(Protocol):
    """A data module whose training draws can be restricted to some sample indices (one ClassSR class per branch
    phase; :class:`effsr.data.SRDataModule` provides it)."""

    def set_train_subset(self, indices: np.ndarray | None) -> None: ...


def split_by_score(scores: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[float]]:
    """Equal-size classes by descending score (class 0 = highest PSNR = simplest) and the K-1 thresholds.

    Ties are broken by index, so class sizes differ by at most one; threshold k is the midpoint between the
    last score of class k and the first of class k + 1 (descending, e.g. ``[35.15, 27.17]`` for K = 3).
    """
    count = len(scores)
    if count < num_classes:
        raise ConfigError(f"the split needs at least {num_classes} training sub-images, got {count}")
    order = np.lexsort((np.arange(count), -np.asarray(scores, dtype=np.float64)))
    labels = np.empty(count, dtype=np.uint8)
    labels[order] = (np.arange(count) * num_classes // count).astype(np.uint8)
    thresholds = []
    for k in range(1, num_classes):
        boundary = -(-k * count // num_classes)
        low, high = float(scores[order[boundary]]), float(scores[order[boundary - 1]])
        thresholds.append((low + high) / 2 if math.isfinite(high) else low)
    return labels, thresholds


def split_by_thresholds(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Classes by fixed PSNR thresholds (the official ``divide_sub_images_train.py``): class k = number of
    thresholds above the score, so ``score >= t_0`` is class 0 (simplest) and ``score < t_last`` the hardest."""
    ordered = np.sort(np.asarray(thresholds, dtype=np.float64))[::-1]
    values = np.asarray(scores, dtype=np.float64)
    return (values[:, None] < ordered[None, :]).sum(axis=1).astype(np.uint8)


def _histogram_image(scores: np.ndarray, thresholds: list[float], title: str) -> np.ndarray:
    """HxWx3 uint8 rendering of the patch-PSNR histogram with the class thresholds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    finite = scores[np.isfinite(scores)]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.hist(finite, bins=min(100, max(10, len(finite) // 20)), color="#4a6fa5")
    for threshold in thresholds:
        axis.axvline(threshold, color="#c0392b", linestyle="--")
        axis.text(threshold, axis.get_ylim()[1] * 0.95, f" {threshold:.2f} dB", color="#c0392b",
                  rotation=90, va="top", ha="left", fontsize=8)
    axis.set_xlabel("reference PSNR of the sub-image (dB)")
    axis.set_ylabel("sub-images")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buffer).convert("RGB"))


class SplitMixin:
    """ClassSRModule's split: scoring every training sub-image (sharded over DDP ranks), the on-disk cache keyed
    by data and scoring weights, the cut into classes, its logs and histogram, and the training draws restricted
    to the classes of the branches a phase trains."""

    def _datamodule(self) -> Any:
        """The trainer's data module, which must be able to restrict its draws (:class:`TrainSubsetSettable`)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, TrainSubsetSettable):
            raise ConfigError("ClassSR's split and branch phases need effsr's SRDataModule (data: ...)")
        return datamodule

    def _apply_data_subset(self) -> None:
        """A ``branches`` phase after the split draws only its branches' classes; every other phase draws all."""
        if self._trainer is None or self.phase_kind() is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, TrainSubsetSettable):
            return
        if self.phase_kind() != "branches" or self.split_labels is None or self.phase_settings.get("all_classes"):
            datamodule.set_train_subset(None)
            return
        trained = self.trained_branches()
        if len(trained) == self.num_classes:
            datamodule.set_train_subset(None)
            return
        indices = np.nonzero(np.isin(self.split_labels.numpy(), trained))[0]
        datamodule.set_train_subset(indices)

    def _split_folder(self, datamodule: Any) -> Path:
        if self.split_cache_dir:
            return Path(self.split_cache_dir).expanduser()
        return Path(getattr(datamodule, "cache_dir", None) or tempfile.gettempdir()) / "classsr_splits"

    def split_cache_key(self, datamodule: Any, scorer: nn.Module | None = None) -> str:
        """Hash of the sub-image table, the bytes of the arrays it reads, the scoring weights and the protocol.

        The arrays' content, not their cache file names: those carry the source files' mtimes, so a re-copied
        data folder (same images, new mtimes) would miss the cache and rescore every sub-image."""
        dataset = datamodule.train_dataset
        digest = hashlib.sha256()
        pairs = dataset.store.pairs
        header = [SPLIT_VERSION, self.num_classes, self.split_metric, int(datamodule.scale), int(dataset.lr_size),
                  [pair.name for pair in pairs]]
        digest.update(json.dumps(header).encode())
        for pair in pairs:
            for array in pair.load():
                digest.update(json.dumps(list(array.shape)).encode())
                digest.update(np.ascontiguousarray(array).data)
        digest.update(np.ascontiguousarray(dataset.table).tobytes())
        scorer = self.network.branches[-1] if scorer is None else scorer
        for key, value in sorted(scorer.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def score_subimages(self, datamodule: Any, scorer: nn.Module | None = None) -> np.ndarray:
        """PSNR of every training sub-image through ``scorer`` (default the reference, i.e. the wide branch);
        each DDP rank scores a shard, then all gather."""
        reference = self.network.branches[-1] if scorer is None else scorer
        was_training = reference.training
        reference.eval()
        crop = self.scale
        indices: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        loader = datamodule.subimage_dataloader(batch_size=self.split_batch_size, split_across_ranks=True)
        device = next(self.network.parameters()).device
        reference.to(device)
        if rank() == 0:
            rank_zero_info(f"[effsr] ClassSR split: scoring {datamodule.num_subimages} sub-images "
                           f"({len(loader)} batches of {self.split_batch_size} per rank)")
        try:
            for batch_index, batch in enumerate(loader):
                lr = batch["lr"].to(device).float().div_(255.0)
                hr = batch["hr"].to(device).float().div_(255.0)
                sr = reference(lr * self.pixel_range) / self.pixel_range
                values = psnr_fn(sr, hr, crop_border=crop, y_channel=self.split_metric == "y")
                indices.append(batch["index"].numpy())
                scores.append(values.cpu().numpy())
                if (batch_index + 1) % 200 == 0 and rank() == 0:
                    rank_zero_info(f"[effsr] ClassSR split: {batch_index + 1}/{len(loader)} batches scored on rank 0")
        finally:
            reference.train(was_training)
        local = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
                 np.concatenate(scores) if scores else np.zeros(0, np.float64))
        total = datamodule.num_subimages
        full = np.full(total, np.nan, dtype=np.float64)
        for part_indices, part_scores in all_gather_objects(local):
            full[part_indices] = part_scores
        if np.isnan(full).any():
            raise ConfigError("ClassSR split: some sub-images were not scored (sampler/rank mismatch)")
        return full

    def compute_split(self, datamodule: Any) -> dict[str, Any]:
        """Scores (or loads the cached scores of) every training sub-image, splits them into K classes, logs.

        Returns the split summary (thresholds, class sizes, whether the cache was used, cache path).
        """
        from effsr.data.datasets import SubImageDataset

        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        if not isinstance(datamodule.train_dataset, SubImageDataset):
            raise ConfigError("ClassSR's split scores fixed sub-images: set data.train_crop: grid")
        scorer = load_split_model(self.split_model, self.scale) if self.split_model else None
        key = self.split_cache_key(datamodule, scorer)
        path = self._split_folder(datamodule) / f"split-{key}.npz"
        scores = None
        if rank() == 0 and path.is_file():
            with np.load(path) as stored:
                if len(stored["scores"]) == datamodule.num_subimages:
                    scores = stored["scores"]
        scores = broadcast_object(scores)
        cached = scores is not None
        if scores is None:
            scores = self.score_subimages(datamodule, scorer)
            if rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(prefix=".split-", suffix=".npz", dir=path.parent)
                with os.fdopen(handle, "wb") as stream:
                    np.savez(stream, scores=scores)
                os.replace(temporary, path)
        if self.fixed_thresholds is None:
            labels, thresholds = split_by_score(scores, self.num_classes)
        else:
            labels, thresholds = split_by_thresholds(scores, self.fixed_thresholds), list(self.fixed_thresholds)
        self.split_labels = torch.from_numpy(labels)
        self.split_thresholds = thresholds
        self.split_key = key
        finite = scores[np.isfinite(scores)]
        self.split_info = {
            "thresholds": thresholds, "class_sizes": np.bincount(labels, minlength=self.num_classes).tolist(),
            "cached": cached, "path": str(path), "num_subimages": int(len(scores)),
            "psnr_mean": float(finite.mean()) if len(finite) else math.nan,
            "scored_by": self.split_model or "reference (wide branch)",
            "thresholds_from": "split_thresholds option" if self.fixed_thresholds else "equal classes",
        }
        rank_zero_info(f"[effsr] ClassSR split ({'cached' if cached else 'computed'}, {path}): "
                       f"{len(scores)} sub-images, thresholds {', '.join(f'{t:.3f}' for t in thresholds)} dB, "
                       f"class sizes {self.split_info['class_sizes']}")
        self._log_split(scores, thresholds)
        return self.split_info

    def _log_split(self, scores: np.ndarray, thresholds: list[float]) -> None:
        if self._trainer is None or rank() != 0:
            return
        metrics = {f"split/threshold_{k}": value for k, value in enumerate(thresholds)}
        metrics.update({"split/cached": float(self.split_info["cached"]), "split/num_subimages": float(len(scores)),
                        "split/psnr_mean": self.split_info["psnr_mean"]})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        title = (f"reference PSNR of {len(scores)} sub-images; thresholds "
                 + ", ".join(f"{t:.2f}" for t in thresholds) + " dB")
        image = _histogram_image(scores, thresholds, title)
        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(image).save(root / "classsr_split_histogram.png")
        for logger in self.loggers:
            log_image(logger, "classsr/split_psnr_histogram", image, caption=title, step=self.global_step)

    def _first_subimages(self, count: int, datamodule: Any = None) -> Tensor | None:
        """The first ``count`` training sub-images (LR, range 1) on the network's device (``train_crop: random``:
        epoch 0's first crops, e.g. a classifier phase on random crops); None without a trainer and without
        ``datamodule``."""
        if datamodule is None and self._trainer is None:
            return None
        datamodule = self._datamodule() if datamodule is None else datamodule
        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        if getattr(datamodule, "train_crop", "grid") == "grid":
            lr = next(iter(datamodule.subimage_dataloader(batch_size=count, split_across_ranks=False)))["lr"]
        else:
            dataset = datamodule.train_dataset
            lr = torch.stack([dataset[index]["lr"] for index in range(min(count, len(dataset)))])
        return lr.to(next(self.network.parameters()).device).float().div_(255.0)

    @torch.no_grad()
    def warn_constant_classifier(self, threshold: float = 1e-4, count: int = 64,
                                 datamodule: Any = None) -> float | None:
        """Warns when the classifier's logits hardly depend on the patch: their std over the first ``count``
        training sub-images (mean over classes) below ``threshold``. From the official 0.1-scaled init ClassSR's
        loss may train only its biases, a constant routing that L_avg rebalances batch by batch (docs/classsr.md,
        'Small-scale reproduction'). Returns that std (None: nothing checked, no trainer and no ``datamodule``)."""
        lr = self._first_subimages(count, datamodule)
        if lr is None:
            return None
        classifier = self.network.classifier
        was_training = classifier.training
        spread = float(classifier.eval()(lr * self.pixel_range).std(dim=0).mean())
        classifier.train(was_training)
        if spread < threshold:
            rank_zero_warn(
                f"[effsr] ClassSR: the classifier's logits barely depend on the patch (std {spread:.1e} over "
                f"{len(lr)} training sub-images, < {threshold:g}): it routes by its biases, not by difficulty. "
                "Try `classifier_init_scale: 1.0` (ClassSRNet) and/or more classifier steps "
                "(docs/classsr.md, 'Small-scale reproduction')")
        return spread

    @torch.no_grad()
    def _interpolation_distance(self, network: nn.Module, lr: Tensor) -> float:
        """Mean |Δ| (pixel range 1) of ``network``'s output from plain bilinear or bicubic upsampling of ``lr``."""
        was_training = network.training
        sr = network.eval()(lr * self.pixel_range) / self.pixel_range
        network.train(was_training)
        return min(float((sr - F.interpolate(lr, scale_factor=self.scale, mode=mode, align_corners=False)).abs().mean())
                   for mode in ("bilinear", "bicubic"))

    def warn_unstarted_branches(self, threshold: float = 1e-3, count: int = 8, datamodule: Any = None) -> list[int]:
        """Warns about (and returns) the branches whose output on the first ``count`` training sub-images is
        within ``threshold`` (mean |Δ|, pixel range 1) of plain bilinear or bicubic upsampling. Such a branch
        has not started its residual path (MSRResNet's 0.1-scaled init sits at its bilinear skip for hundreds
        of Adam steps on some batch orders) and routing patches to it is routing them to interpolation. Called when
        the classifier phase starts (no trainer and no ``datamodule``: nothing checked)."""
        lr = self._first_subimages(count, datamodule)
        if lr is None:
            return []
        unstarted = []
        for index, branch in enumerate(self.network.branches):
            distance = self._interpolation_distance(branch, lr)
            if distance < threshold:
                unstarted.append(index)
                rank_zero_warn(
                    f"[effsr] ClassSR: branch {index} has not started learning: its output is {distance:.1e} "
                    f"(mean |Δ|) from plain interpolation on {len(lr)} training sub-images (< {threshold:g}); "
                    "the classifier would route patches to an upsampler. Train it longer, with the lr still high "
                    "when its residual starts (e.g. a longer `branches` phase with `all_classes: true` first; "
                    "docs/classsr.md, 'Small-scale reproduction')")
        return unstarted

    def warn_unstarted_reference(self, threshold: float = 1e-3, count: int = 8, datamodule: Any = None) -> bool:
        """The same check for the reference (the wide branch when the split starts, the -O model): within
        ``threshold`` of interpolation it scores the split like an upsampler and is no baseline. Returns whether it
        warned (no trainer and no ``datamodule``: nothing checked, False)."""
        lr = self._first_subimages(count, datamodule)
        if lr is None:
            return False
        distance = self._interpolation_distance(self.network.branches[-1], lr)
        if distance >= threshold:
            return False
        rank_zero_warn(
            f"[effsr] ClassSR: the reference (-O model) has not started learning: its output is {distance:.1e} "
            f"(mean |Δ|) from plain interpolation on {len(lr)} training sub-images (< {threshold:g}); the split "
            "scores sub-images by an upsampler's PSNR and -O is no baseline. Train the `reference` phase longer, "
            "with the lr still high when its residual starts (docs/classsr.md, 'Small-scale reproduction')")
        return True
