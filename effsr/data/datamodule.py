"""``SRDataModule``: the one LightningDataModule of effsr (train / val / test / predict)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from effsr.data.cache import ArrayCache, CachedPair, PairSource, default_cache_dir
from effsr.data.datasets import (
    EvalDataset,
    PredictDataset,
    RandomPatchDataset,
    SubImageDataset,
    SubImageView,
    check_eval_images,
)
from effsr.data.samplers import EvalSampler, TrainBatchSampler, TrainSampler
from effsr.data.sources import (
    LRSource,
    check_batch_size,
    check_data_scale,
    predict_paths,
    resolve_eval_set,
    resolve_train_sources,
)
from effsr.errors import ConfigError

TrainCrop = Literal["random", "grid"]


class SRDataModule(L.LightningDataModule):
    """Paired LR/HR super-resolution data: iteration-based training, whole-image eval sets, prediction.

    Batches (uint8 tensors, normalised on the device by SRModule): train ``{"lr", "hr", "index"}``,
    val/test (batch 1) ``{"lr", "hr", "name"}`` with dataloader k = ``eval_set_names[k]``, predict
    ``{"lr", "name"}``. Train and eval images are decoded once into the array cache (``prepare_data``).
    The trainer must run with ``use_distributed_sampler=False`` (effsr's CLI sets it): the samplers here
    split data across ranks themselves (eval: every image exactly once, no padding).

    Args:
        scale: upscaling factor (integer >= 2; official LR files exist for 2, 3, 4).
        train: training source: ``sample`` | ``div2k`` | ``flickr2k`` | ``df2k`` (under ``data_root``) | a
            folder of HR images (``HR_DIR`` or ``HR_DIR:LR_DIR``), or a list of these, concatenated in order
            (``[div2k, /data/extra]``; indices of the first entry stay as they are alone).
        data_root: folder holding ``DIV2K/`` and ``Flickr2K/`` (docs/protocol.md layout).
        val_sets: validation sets: ``sample`` (held-out sample photos), ``div2k_valid``, or HR folders
            (set name = folder name; ``HR_DIR:LR_DIR``; the benchmark layouts ``Set5/HR`` +
            ``Set5/LR_bicubic/X<s>`` and ClassSR's ``Test2K/HR/X<s>`` + ``Test2K/LR/X<s>`` use the shipped LR,
            given as the set folder or its ``HR`` folder). Images below ``min_eval_hr_size(scale)`` (x4: 20
            pixels a side) are an error.
        test_sets: test sets, same forms as ``val_sets``.
        predict_path: an LR image or a folder of LR images for ``predict``.
        lr_patch_size: LR side of a random training patch (HR side = ``lr_patch_size * scale``).
        batch_size: training batch size per rank; a pipeline phase may change it (``set_batch_size``,
            phase setting ``batch_size``).
        samples_per_epoch: training samples per epoch over all ranks (each rank draws ``// world size``);
            with ``batch_size`` this fixes the epoch length in steps, ``ceil(samples_per_epoch // world size
            / batch_size)``, which phases with another batch size keep (drawing more or fewer samples).
        num_workers: DataLoader worker processes (also threads used to build the cache).
        train_crop: ``random`` LR-grid-aligned crops, or ``grid`` fixed sub-images (ClassSR).
        hr_subimage_size: HR side of a grid sub-image (LR = ``// scale``).
        hr_subimage_step: HR stride between grid sub-images.
        hr_subimage_flush_above: a last sub-image flush with the image border is added when the strip left
            after the regular grid is longer than this (HR px; 0: any strip; ClassSR's official extraction: 48).
        train_rescales: grid mode: also extract sub-images from MATLAB-bicubic rescales of each HR image
            (e.g. ``[1.0, 0.9, 0.8, 0.7, 0.6]``).
        cache_dir: decoded-array cache (default ``$EFFSR_CACHE`` or ``~/.cache/effsr``).
        seed: seed of crops, augmentation and sampling order.
        max_val_images: keep only the first N images of each validation set (None: all).
        lr_source: ``auto`` (official LR when its folder exists, else generated), ``official`` (required),
            ``generated`` (always MATLAB-bicubic from HR).
        skip_small_images: skip training images smaller than the HR patch instead of raising an error.
    """

    def __init__(
        self,
        scale: int = 4,
        train: str | list[str] = "sample",
        data_root: str | None = None,
        val_sets: Sequence[str] = ("sample",),
        test_sets: Sequence[str] = (),
        predict_path: str | None = None,
        lr_patch_size: int = 48,
        batch_size: int = 16,
        samples_per_epoch: int = 16000,
        num_workers: int = 4,
        train_crop: TrainCrop = "random",
        hr_subimage_size: int = 128,
        hr_subimage_step: int = 64,
        hr_subimage_flush_above: int = 0,
        train_rescales: Sequence[float] = (1.0,),
        cache_dir: str | None = None,
        seed: int = 0,
        max_val_images: int | None = None,
        lr_source: LRSource = "auto",
        skip_small_images: bool = False,
    ) -> None:
        super().__init__()
        check_data_scale(scale)
        if train_crop not in ("random", "grid"):
            raise ConfigError(f"data.train_crop must be 'random' or 'grid', got {train_crop!r}")
        if lr_source not in ("auto", "official", "generated"):
            raise ConfigError(f"data.lr_source must be auto, official or generated, got {lr_source!r}")
        if batch_size < 1 or num_workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")
        if any(rescale <= 0 or rescale > 1 for rescale in train_rescales) or not train_rescales:
            raise ConfigError(f"data.train_rescales must be factors in (0, 1], got {list(train_rescales)}")
        if train_crop == "random" and list(train_rescales) != [1.0]:
            raise ConfigError("data.train_rescales applies to train_crop=grid only; set train_crop: grid")
        self.scale = scale
        self.train = train
        self.data_root = data_root
        self.val_sets = list(val_sets)
        self.test_sets = list(test_sets)
        self.predict_path = predict_path
        self.lr_patch_size = lr_patch_size
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.train_crop = train_crop
        self.hr_subimage_size = hr_subimage_size
        self.hr_subimage_step = hr_subimage_step
        self.hr_subimage_flush_above = hr_subimage_flush_above
        self.train_rescales = [float(rescale) for rescale in train_rescales]
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = seed
        self.max_val_images = max_val_images
        self.lr_source: LRSource = lr_source
        self.skip_small_images = skip_small_images
        self.cache = ArrayCache(self.cache_dir, scale)
        self.train_dataset: RandomPatchDataset | SubImageDataset | None = None
        self.val_datasets: list[EvalDataset] = []
        self.test_datasets: list[EvalDataset] = []
        self.predict_dataset: PredictDataset | None = None
        self._eval_stage = "validate"
        self._train_subset: np.ndarray | None = None
        self._train_sampler: TrainSampler | None = None
        self._train_batch_sampler: TrainBatchSampler | None = None
        self._train_batch_size = batch_size

    def _eval_sources(self, entries: Sequence[str], limit: int | None) -> list[tuple[str, list[PairSource]]]:
        sets = [resolve_eval_set(entry, self.data_root, self.scale, self.cache_dir, self.lr_source)
                for entry in entries]
        names = [name for name, _ in sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"evaluation set names must be unique, got {names}: rename a folder")
        return [(name, pairs[:limit] if limit else pairs) for name, pairs in sets]

    def _stages(self, stage: str | None) -> set[str]:
        """Which parts (train/val/test/predict) a Lightning stage needs."""
        return {
            "fit": {"train", "val"}, "validate": {"val"}, "test": {"test"}, "predict": {"predict"},
        }.get(stage or "", {"train", "val", "test"})

    def _trainer_stage(self) -> str | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}.get(
            getattr(trainer.state.fn, "value", None)
        )

    def _progress(self, what: str):
        def report(done: int, total: int) -> None:
            if done == total or done % 50 == 0:
                print(f"effsr data: cached {done}/{total} {what} images in {self.cache.folder}", file=sys.stderr)

        return report

    def _train_entries(self) -> list[CachedPair]:
        sources = resolve_train_sources(self.train, self.data_root, self.scale, self.cache_dir, self.lr_source)
        rescales = self.train_rescales if self.train_crop == "grid" else [1.0]
        return self.cache.build_all(sources, rescales, self.num_workers, self._progress("train"))

    def _eval_entries(self, entries: Sequence[str], limit: int | None) -> list[tuple[str, list[CachedPair]]]:
        sets = []
        for name, pairs in self._eval_sources(entries, limit):
            cached = self.cache.build_all(pairs, (1.0,), self.num_workers, self._progress(name))
            check_eval_images(name, cached, self.scale)
            sets.append((name, cached))
        return sets

    def prepare_data(self) -> None:
        """Decodes every image the current stage needs into the cache (Lightning: local rank 0 only)."""
        self.build_cache(self._trainer_stage())

    def build_cache(self, stage: str | None = None) -> None:
        """Builds the cache entries of ``stage`` (None: train, val and test sets); see ``effsr data prepare``."""
        parts = self._stages(stage)
        if "train" in parts:
            self._train_entries()
        if "val" in parts:
            self._eval_entries(self.val_sets, self.max_val_images)
        if "test" in parts:
            self._eval_entries(self.test_sets, None)

    def setup(self, stage: str | None = None) -> None:
        """Creates the datasets of ``stage`` from the cache (entries missing on this rank are built)."""
        parts = self._stages(stage)
        if "train" in parts:
            entries = self._train_entries()
            if self.train_crop == "grid":
                self.train_dataset = SubImageDataset(
                    entries, self.scale, self.hr_subimage_size, self.hr_subimage_step, self.seed,
                    self.hr_subimage_flush_above,
                )
            else:
                self.train_dataset = RandomPatchDataset(
                    entries, self.scale, self.lr_patch_size, self.seed, self.skip_small_images
                )
        if "val" in parts:
            self.val_datasets = [EvalDataset(name, pairs)
                                 for name, pairs in self._eval_entries(self.val_sets, self.max_val_images)]
            self._eval_stage = "validate"
        if "test" in parts:
            self.test_datasets = [EvalDataset(name, pairs) for name, pairs in self._eval_entries(self.test_sets, None)]
            if stage == "test":
                self._eval_stage = "test"
        if "predict" in parts:
            if self.predict_path is None:
                raise ConfigError("predict needs data.predict_path (an LR image or a folder of LR images)")
            self.predict_dataset = PredictDataset(predict_paths(self.predict_path))

    @property
    def eval_set_names(self) -> list[str]:
        """Names of the evaluation sets of the current stage (dataloader k = set k)."""
        datasets = self.test_datasets if self._eval_stage == "test" else self.val_datasets
        return [dataset.name for dataset in datasets]

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation sets."""
        return [dataset.name for dataset in self.val_datasets]

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test sets."""
        return [dataset.name for dataset in self.test_datasets]

    @property
    def num_subimages(self) -> int:
        """Number of training samples addressable by ``index`` (grid: sub-images; random: images)."""
        return len(self._require_train())

    def subimage(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, hr) HxWx3 uint8 of grid sub-image ``index`` (``train_crop=grid``)."""
        dataset = self._require_train()
        if not isinstance(dataset, SubImageDataset):
            raise ConfigError("subimage() needs data.train_crop=grid")
        return dataset.subimage(index)

    def subimage_dataloader(self, batch_size: int = 64, split_across_ranks: bool = True) -> DataLoader:
        """Every grid sub-image once, un-augmented, in index order: ``{"lr", "hr", "index"}``.

        With ``split_across_ranks`` each DDP rank gets indices rank, rank + W, ... (gather the scores).
        """
        dataset = self._require_train()
        if not isinstance(dataset, SubImageDataset):
            raise ConfigError("subimage_dataloader() needs data.train_crop=grid")
        sampler = EvalSampler(len(dataset)) if split_across_ranks else EvalSampler(len(dataset), 0, 1)
        return DataLoader(SubImageView(dataset), batch_size=batch_size, sampler=sampler,
                          **{**self._loader_kwargs(), "persistent_workers": False})

    def set_train_subset(self, indices: np.ndarray | None) -> None:
        """Restricts training draws to dataset indices ``indices`` (None: all), e.g. one ClassSR class."""
        self._train_subset = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self._train_sampler is not None:
            self._train_sampler.set_subset(self._train_subset)

    @property
    def train_batch_size(self) -> int:
        """The per-rank batch size of the training batches drawn now (``data.batch_size`` unless changed)."""
        return self._train_batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """Per-rank training batch size from the next batch drawn on, without rebuilding the loader.

        Like :meth:`set_train_subset`, batches the DataLoader already prefetched (up to
        ``num_workers * prefetch_factor``) keep the old size. The epoch length in steps stays that of
        ``data.batch_size``; ``set_batch_size(self.batch_size)`` restores the configured size.
        """
        self._train_batch_size = check_batch_size(batch_size, "the training batch size")
        if self._train_batch_sampler is not None:
            self._train_batch_sampler.set_batch_size(self._train_batch_size)

    def _require_train(self) -> RandomPatchDataset | SubImageDataset:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self.train_dataset

    def _loader_kwargs(self) -> dict[str, object]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """Batches ``{"lr", "hr", "index"}`` drawn by a rank-aware, seeded TrainSampler.

        The batches come from a :class:`TrainBatchSampler`: its length (steps per epoch) follows
        ``data.batch_size``, the size of each batch the current ``set_batch_size``.
        """
        dataset = self._require_train()
        self._train_sampler = TrainSampler(len(dataset), self.samples_per_epoch, self.seed)
        if self._train_subset is not None:
            self._train_sampler.set_subset(self._train_subset)
        self._train_batch_sampler = TrainBatchSampler(self._train_sampler, self.batch_size, self._train_batch_size)
        return DataLoader(dataset, batch_sampler=self._train_batch_sampler, **self._loader_kwargs())

    def _eval_loaders(self, datasets: list[EvalDataset]) -> list[DataLoader]:
        kwargs = self._loader_kwargs()
        kwargs["num_workers"] = min(self.num_workers, 2)
        kwargs["persistent_workers"] = False
        return [DataLoader(dataset, batch_size=1, sampler=EvalSampler(len(dataset)), **kwargs) for dataset in datasets]

    def val_dataloader(self) -> list[DataLoader]:
        """One whole-image loader per validation set (batch 1)."""
        if not self.val_datasets and self.val_sets:
            self.setup("validate")
        self._eval_stage = "validate"
        return self._eval_loaders(self.val_datasets)

    def test_dataloader(self) -> list[DataLoader]:
        """One whole-image loader per test set (batch 1)."""
        if not self.test_datasets:
            if not self.test_sets:
                raise ConfigError("test needs data.test_sets (e.g. [sample] or a list of HR folders)")
            self.setup("test")
        self._eval_stage = "test"
        return self._eval_loaders(self.test_datasets)

    def predict_dataloader(self) -> DataLoader:
        """LR images one by one: ``{"lr", "name"}``."""
        if self.predict_dataset is None:
            self.setup("predict")
        assert self.predict_dataset is not None
        return DataLoader(self.predict_dataset, batch_size=1, sampler=EvalSampler(len(self.predict_dataset)),
                          **{**self._loader_kwargs(), "persistent_workers": False})
