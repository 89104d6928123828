"""The embedded **sample** set: photographs that scikit-image ships, written once as PNG files.

scikit-image installs nine colour photographs without a download; the grayscale photographs are added to
the training split converted to RGB (R = G = B) so the model sees enough texture.

- train (12): ``rocket``, ``hubble_deep_field``, ``immunohistochemistry``, ``retina``,
  ``motorcycle_left``, ``motorcycle_right`` (colour) and ``camera``, ``moon``, ``coins``, ``grass``,
  ``gravel``, ``brick`` (grayscale → RGB);
- held out (3, validation/test ``sample``): ``astronaut``, ``chelsea``, ``coffee`` (colour, never trained on).

The PNGs live in ``<cache_dir>/sample/v1/{train,heldout}/<name>.png`` and are real image files read by
the same code as any other folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from effsr.data.io import list_images, to_rgb_uint8, write_image
from effsr.errors import DataError

SAMPLE_VERSION = "v1"
SAMPLE_TRAIN = (
    "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right",
    "camera", "moon", "coins", "grass", "gravel", "brick",
)
SAMPLE_HELDOUT = ("astronaut", "chelsea", "coffee")


def _loader(name: str) -> Callable[[], np.ndarray]:
    """The skimage.data function returning photograph ``name``."""
    import skimage.data

    if name == "motorcycle_left":
        return lambda: skimage.data.stereo_motorcycle()[0]
    if name == "motorcycle_right":
        return lambda: skimage.data.stereo_motorcycle()[1]
    return getattr(skimage.data, name)


def sample_photograph(name: str) -> np.ndarray:
    """One sample photograph as HxWx3 uint8 RGB."""
    try:
        image = _loader(name)()
    except ImportError as error:
        raise DataError(
            "the sample set needs scikit-image: pip install scikit-image (or pip install -e '.[dev]')"
        ) from error
    return to_rgb_uint8(np.asarray(image), f"skimage.data.{name}", bgr=False)


def sample_dir(cache_dir: str | Path, split: str) -> Path:
    """Folder of the sample split (``train`` or ``heldout``), written on first use."""
    if split not in ("train", "heldout"):
        raise DataError(f"unknown sample split {split!r}: use 'train' or 'heldout'")
    folder = Path(cache_dir) / "sample" / SAMPLE_VERSION / split
    names = SAMPLE_TRAIN if split == "train" else SAMPLE_HELDOUT
    for name in names:
        target = folder / f"{name}.png"
        if not target.is_file():
            write_image(target, sample_photograph(name))
    found = {path.stem for path in list_images(folder)}
    if not set(names) <= found:
        raise DataError(f"sample folder {folder} is incomplete: remove it so it is written again")
    return folder
