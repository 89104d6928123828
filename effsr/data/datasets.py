"""Datasets of the SR pipeline (the data sources are in ``effsr.data.sources``, the samplers and the
per-sample randomness in ``effsr.data.samplers``).

Training samples are keyed by ``SampleKey(epoch, position, index)``: ``position`` is the sample's place in
the epoch's global draw order (over all ranks), so its random crop and dihedral element depend only on
(seed, epoch, position): not on the DataLoader worker, the number of workers or the rank, and a resumed
run redraws exactly the same samples. Randomness comes from a counter-based hash (splitmix64), and the
dihedral element (hflip, vflip, transpose, each p = 0.5) is applied with albumentations pipelines whose
transforms have p = 1, so albumentations' own RNG state never matters (``effsr.data.augment``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from effsr.data.cache import CachedPair
from effsr.data.io import read_image
from effsr.data.samplers import SampleKey, sample_random
from effsr.errors import ConfigError, DataError
from effsr.metrics import SSIM_WINDOW


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array → contiguous (3,H,W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class _CachedPairs:
    """Lazily opened memory maps of cached pairs (reopened in each worker process)."""

    def __init__(self, pairs: Sequence[CachedPair]) -> None:
        self.pairs = list(pairs)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(index)
        if arrays is None:
            arrays = self._arrays[index] = self.pairs[index].load()
        return arrays

    def lr_shape(self, index: int) -> tuple[int, int]:
        hr, lr = self.pairs[index].load()
        return int(lr.shape[0]), int(lr.shape[1])

    def __getstate__(self) -> dict[str, object]:
        return {"pairs": self.pairs, "_arrays": {}}


class _TrainBase(Dataset):
    """Shared augmentation and sample-key handling of the two training datasets."""

    def __init__(self, pairs: Sequence[CachedPair], scale: int, seed: int) -> None:
        from effsr.data.augment import DihedralAugment  # albumentations only where training data is made

        self.store = _CachedPairs(pairs)
        self.scale = scale
        self.seed = seed
        self.augment = DihedralAugment()

    def _key(self, key: SampleKey | tuple[int, int, int] | int) -> SampleKey:
        if isinstance(key, (int, np.integer)):
            return SampleKey(0, int(key), int(key))
        return SampleKey(*(int(value) for value in key))

    def _sample(self, lr: np.ndarray, hr: np.ndarray, key: SampleKey, stream: int) -> dict[str, torch.Tensor]:
        element = sample_random(self.seed, key.epoch, key.position, stream) & 7
        lr, hr = self.augment(lr, hr, element)
        return {"lr": to_chw_tensor(lr), "hr": to_chw_tensor(hr), "index": torch.tensor(key.index, dtype=torch.int64)}


class RandomPatchDataset(_TrainBase):
    """Random LR-grid-aligned paired crops of whole cached images (``train_crop=random``); index = image."""

    def __init__(
        self, pairs: Sequence[CachedPair], scale: int, lr_patch_size: int, seed: int = 0, skip_small: bool = False
    ) -> None:
        if lr_patch_size < 1:
            raise ConfigError(f"data.lr_patch_size must be >= 1, got {lr_patch_size}")
        kept = []
        for pair in pairs:
            height, width = _CachedPairs([pair]).lr_shape(0)
            if height >= lr_patch_size and width >= lr_patch_size:
                kept.append(pair)
            elif not skip_small:
                raise DataError(
                    f"image {pair.source.hr_path} ({width * scale}x{height * scale} after mod-crop) is smaller "
                    f"than the HR patch {lr_patch_size * scale}x{lr_patch_size * scale} "
                    f"(lr_patch_size={lr_patch_size} at x{scale}): remove it, lower data.lr_patch_size, "
                    "or set data.skip_small_images=true"
                )
        if not kept:
            raise DataError(f"no training image is at least {lr_patch_size * scale} pixels on each side")
        super().__init__(kept, scale, seed)
        self.lr_patch_size = lr_patch_size
        self.shapes = [self.store.lr_shape(i) for i in range(len(kept))]

    def __len__(self) -> int:
        return len(self.store.pairs)

    def __getitem__(self, key: SampleKey | tuple[int, int, int] | int) -> dict[str, torch.Tensor]:
        key = self._key(key)
        hr_image, lr_image = self.store.arrays(key.index)
        height, width = self.shapes[key.index]
        size, scale = self.lr_patch_size, self.scale
        top = sample_random(self.seed, key.epoch, key.position, 1) % (height - size + 1)
        left = sample_random(self.seed, key.epoch, key.position, 2) % (width - size + 1)
        lr = lr_image[top : top + size, left : left + size]
        hr = hr_image[top * scale : (top + size) * scale, left * scale : (left + size) * scale]
        return self._sample(lr, hr, key, 3)


def grid_positions(length: int, size: int, step: int, flush_above: int = 0) -> np.ndarray:
    """Sub-image starts along one axis: every ``step``, plus one flush with the end when the strip left after
    the last one is longer than ``flush_above`` (0: any strip, BasicSR's extraction; ClassSR's official
    ``extract_subimages_train.py`` uses 48 HR px, i.e. 48 / scale in these LR units)."""
    if length < size:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, length - size + 1, step, dtype=np.int64)
    if length - (starts[-1] + size) > flush_above:
        starts = np.append(starts, length - size)
    return starts


class SubImageDataset(_TrainBase):
    """Fixed grid sub-images of every cached (rescaled) image (``train_crop=grid``, ClassSR).

    Sub-image ``i`` has a stable global index (``table[i] = (pair, lr_top, lr_left)``), the batch's ``index``.
    """

    def __init__(
        self, pairs: Sequence[CachedPair], scale: int, hr_subimage_size: int = 128, hr_subimage_step: int = 64,
        seed: int = 0, hr_subimage_flush_above: int = 0,
    ) -> None:
        if hr_subimage_size % scale or hr_subimage_step % scale or hr_subimage_step < scale:
            raise ConfigError(
                f"data.hr_subimage_size ({hr_subimage_size}) and data.hr_subimage_step ({hr_subimage_step}) must be "
                f"positive multiples of the scale ({scale}) so LR sub-images lie on the LR grid"
            )
        super().__init__(pairs, scale, seed)
        self.lr_size = hr_subimage_size // scale
        lr_step = hr_subimage_step // scale
        rows = []
        for pair_index in range(len(self.store.pairs)):
            height, width = self.store.lr_shape(pair_index)
            flush = hr_subimage_flush_above // scale
            tops = grid_positions(height, self.lr_size, lr_step, flush)
            lefts = grid_positions(width, self.lr_size, lr_step, flush)
            grid = np.stack(np.meshgrid(tops, lefts, indexing="ij"), axis=-1).reshape(-1, 2)
            rows.append(np.concatenate([np.full((len(grid), 1), pair_index, dtype=np.int64), grid], axis=1))
        self.table = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 3), dtype=np.int32)
        if len(self.table) == 0:
            raise DataError(
                f"no training image is at least {hr_subimage_size} pixels on each side (data.hr_subimage_size)"
            )

    @property
    def num_subimages(self) -> int:
        """Number of sub-images (the global index range)."""
        return len(self.table)

    def __len__(self) -> int:
        return self.num_subimages

    def subimage(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, hr) HxWx3 uint8 copies of sub-image ``index`` (no augmentation)."""
        pair_index, top, left = (int(value) for value in self.table[index])
        hr_image, lr_image = self.store.arrays(pair_index)
        size, scale = self.lr_size, self.scale
        lr = lr_image[top : top + size, left : left + size]
        hr = hr_image[top * scale : (top + size) * scale, left * scale : (left + size) * scale]
        return np.array(lr), np.array(hr)

    def subimage_source(self, index: int) -> tuple[str, int, int]:
        """(image name incl. rescale, HR top, HR left) of sub-image ``index``."""
        pair_index, top, left = (int(value) for value in self.table[index])
        return self.store.pairs[pair_index].name, top * self.scale, left * self.scale

    def __getitem__(self, key: SampleKey | tuple[int, int, int] | int) -> dict[str, torch.Tensor]:
        key = self._key(key)
        lr, hr = self.subimage(key.index)
        return self._sample(lr, hr, key, 3)


class SubImageView(Dataset):
    """Un-augmented grid sub-images in index order, ``{"lr", "hr", "index"}`` (for scoring, e.g. ClassSR)."""

    def __init__(self, dataset: SubImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_subimages

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        lr, hr = self.dataset.subimage(index)
        return {"lr": to_chw_tensor(lr), "hr": to_chw_tensor(hr), "index": torch.tensor(index, dtype=torch.int64)}




def min_eval_hr_size(scale: int) -> int:
    """Smallest HR side an evaluation image may have at ``scale``: after mod-crop and the ``scale``-pixel
    border crop of the protocol, SSIM's 11x11 window must still fit (x2: 16, x3: 18, x4: 20)."""
    return scale * math.ceil((2 * scale + SSIM_WINDOW) / scale)


def check_eval_images(name: str, pairs: Sequence[CachedPair], scale: int) -> None:
    """Raises DataError for an image of eval set ``name`` too small to be scored (before any model runs)."""
    minimum = min_eval_hr_size(scale)
    for pair in pairs:
        hr, _ = pair.load()
        height, width = int(hr.shape[0]), int(hr.shape[1])
        if min(height, width) < minimum:
            raise DataError(
                f"evaluation image {pair.source.hr_path} of set {name!r} is {width}x{height} after mod-crop at "
                f"x{scale}, too small to score: at x{scale} the protocol needs at least {minimum}x{minimum} HR "
                f"pixels (mod-crop to {scale}, {scale} border pixels cropped on each side, SSIM's "
                f"{SSIM_WINDOW}x{SSIM_WINDOW} window): remove it from the set"
            )


class EvalDataset(Dataset):
    """Whole mod-cropped images of one evaluation set: ``{"lr", "hr", "name"}``."""

    def __init__(self, name: str, pairs: Sequence[CachedPair]) -> None:
        self.name = name
        self.store = _CachedPairs(pairs)

    def __len__(self) -> int:
        return len(self.store.pairs)

    def __getitem__(self, index: int) -> dict[str, object]:
        hr, lr = self.store.pairs[index].load()
        return {"lr": to_chw_tensor(lr), "hr": to_chw_tensor(hr), "name": self.store.pairs[index].source.name}


class PredictDataset(Dataset):
    """LR images of any size: ``{"lr", "name"}``."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {"lr": to_chw_tensor(read_image(self.paths[index])), "name": self.paths[index].stem}
