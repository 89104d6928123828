"""The dihedral (D4) augmentation of the training samples, as albumentations pipelines whose transforms have
p = 1 (the element is drawn by the dataset's counter-based randomness, ``effsr.data.datasets``). Its own module so
that albumentations (~1 s to import) is imported only by the processes that build training data, not by every
``effsr`` start (test, predict, profile, compare, --help)."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


class _CV2Transpose(A.Transpose):
    """albumentations' Transpose computed with cv2.transpose (6x faster than numpy's strided copy)."""

    def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
        return cv2.transpose(np.ascontiguousarray(img))


class DihedralAugment:
    """The 8 elements of D4 (hflip, vflip, transpose, each p = 0.5) applied identically to LR and HR."""

    def __init__(self) -> None:
        self.pipelines = []
        for element in range(8):
            transforms: list[A.BasicTransform] = []
            if element & 1:
                transforms.append(A.HorizontalFlip(p=1.0))
            if element & 2:
                transforms.append(A.VerticalFlip(p=1.0))
            if element & 4:
                transforms.append(_CV2Transpose(p=1.0))
            self.pipelines.append(A.Compose(transforms, additional_targets={"hr": "image"}, is_check_shapes=False))

    def __call__(self, lr: np.ndarray, hr: np.ndarray, element: int) -> tuple[np.ndarray, np.ndarray]:
        """Applies dihedral ``element`` (bit 0 hflip, bit 1 vflip, bit 2 transpose) to both arrays."""
        if element == 0:
            return lr, hr
        out = self.pipelines[element](image=np.ascontiguousarray(lr), hr=np.ascontiguousarray(hr))
        return out["image"], out["hr"]
