"""Data sources: which HR images (and which official LR files) a data option names.

Layouts (``resolve_train_sources`` / ``resolve_eval_set``), as in docs/protocol.md:

- ``div2k``: ``<root>/DIV2K/DIV2K_train_HR/0001.png``, official LR ``DIV2K_train_LR_bicubic/X<s>/0001x<s>.png``;
- ``flickr2k``: ``<root>/Flickr2K/Flickr2K_HR/000001.png``, ``Flickr2K_LR_bicubic/X<s>/000001x<s>.png``;
- ``df2k``: both; ``sample``: the scikit-image photographs (``effsr.data.sample``);
- any folder of HR images, optionally ``HR_DIR:LR_DIR``; an ``HR`` folder next to ``LR_bicubic/X<s>`` uses
  that LR folder (EDSR/SMSR's ``benchmark/Set5``), ClassSR's ``Test2K/HR/X<s>`` uses ``Test2K/LR/X<s>``; the
  set folder (``Set5``, ``Test2K``) or its ``HR`` folder may be given instead. LR files are
  ``<stem>x<s>.<ext>`` or ``<stem>.<ext>``; the set name is the folder above ``HR``.
- train only: a list of the entries above (concatenated in order);
- eval only: ``div2k_valid`` (``DIV2K_valid_HR``, 0801–0900).

Official LR is used when its folder exists (``lr_source="auto"``); otherwise LR is generated with the
MATLAB-compatible bicubic and cached (``effsr.data.cache``). The checks of the options that size what a source
yields (``data.scale``, batch sizes) live here too, for the modules that read sources.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from effsr.data.cache import PairSource
from effsr.data.io import IMAGE_SUFFIXES, list_images
from effsr.errors import ConfigError, DataError

OFFICIAL_LR_SCALES = (2, 3, 4)
LRSource = Literal["auto", "official", "generated"]

_LAYOUTS = {
    "div2k": "<data_root>/DIV2K/DIV2K_train_HR/0001.png ... 0800.png "
    "(official LR optional: <data_root>/DIV2K/DIV2K_train_LR_bicubic/X<s>/0001x<s>.png)",
    "div2k_valid": "<data_root>/DIV2K/DIV2K_valid_HR/0801.png ... 0900.png "
    "(official LR optional: <data_root>/DIV2K/DIV2K_valid_LR_bicubic/X<s>/0801x<s>.png)",
    "flickr2k": "<data_root>/Flickr2K/Flickr2K_HR/000001.png ... 002650.png "
    "(official LR optional: <data_root>/Flickr2K/Flickr2K_LR_bicubic/X<s>/000001x<s>.png)",
    "folder": "a folder holding the HR images (.png/.jpg/...) directly, optionally given as HR_DIR:LR_DIR",
}


def check_data_scale(scale: int) -> None:
    """Raises ConfigError unless ``data.scale`` is an integer ≥ 2 (any such factor can be degraded; which scales a
    backbone supports is :func:`effsr.archs.common.check_scale`'s rule)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ConfigError(f"data.scale must be an integer >= 2 (got {scale!r}): use 2, 3 or 4 for the standard sets")


def check_batch_size(batch_size: object, what: str) -> int:
    """``batch_size`` as an int, or a ConfigError naming ``what`` (the option) unless it is an integer ≥ 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _hr_images(folder: Path, layout: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; expected layout: {_LAYOUTS[layout]}")
    images = list_images(folder)
    if not images:
        raise DataError(
            f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected layout: {_LAYOUTS[layout]}"
        )
    return images


def _find_lr(lr_dir: Path, hr_path: Path, scale: int) -> Path:
    for stem in (f"{hr_path.stem}x{scale}", hr_path.stem):
        for suffix in (hr_path.suffix, *IMAGE_SUFFIXES):
            candidate = lr_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(
        f"LR folder {lr_dir} has no LR image for {hr_path} (looked for {hr_path.stem}x{scale}.png / "
        f"{hr_path.stem}.png): add it, or set data.lr_source=generated to make every LR with the MATLAB bicubic"
    )


def pairs_from_folders(
    hr_dir: Path, lr_dir: Path | None, scale: int, layout: str = "folder", prefix: str = ""
) -> list[PairSource]:
    """Pairs of the HR images in ``hr_dir`` with their LR files in ``lr_dir`` (None → generated LR)."""
    images = _hr_images(hr_dir, layout)
    return [
        PairSource(prefix + path.stem, path, None if lr_dir is None else _find_lr(lr_dir, path, scale))
        for path in images
    ]


def _official_lr_dir(candidate: Path, scale: int, lr_source: LRSource, what: str) -> Path | None:
    if lr_source == "generated":
        return None
    if lr_source == "official":
        if scale not in OFFICIAL_LR_SCALES:
            raise ConfigError(
                f"data.lr_source=official: official LR exists for x2/x3/x4 only, not x{scale}; "
                "use lr_source=auto or generated"
            )
        if not candidate.is_dir():
            raise DataError(f"data.lr_source=official but the LR folder {candidate} of {what} does not exist")
        return candidate
    return candidate if candidate.is_dir() else None


def _named_source(
    name: str, data_root: str | None, scale: int, lr_source: LRSource, split: Literal["train", "valid"]
) -> list[PairSource]:
    if data_root is None:
        raise ConfigError(f"data set {name!r} needs data.data_root (the folder holding DIV2K/ and Flickr2K/)")
    root = Path(data_root).expanduser()
    if name == "flickr2k":
        base = root / "Flickr2K"
        hr_dir, lr_dir = base / "Flickr2K_HR", base / "Flickr2K_LR_bicubic" / f"X{scale}"
    else:
        base = root / "DIV2K"
        hr_dir, lr_dir = base / f"DIV2K_{split}_HR", base / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
    layout = "div2k_valid" if split == "valid" else name
    return pairs_from_folders(hr_dir, _official_lr_dir(lr_dir, scale, lr_source, name), scale, layout)


_HR_FOLDER_NAMES = ("HR", "GT", "GTMOD12")
_SCALE_FOLDER = re.compile(r"X(\d+)", re.IGNORECASE)


def _is_per_scale_hr(folder: Path) -> bool:
    """True for ClassSR's ``<set>/HR/X<s>`` (HR images stored per scale)."""
    return bool(_SCALE_FOLDER.fullmatch(folder.name)) and folder.parent.name.upper() == "HR"


def _locate_hr(folder: Path, scale: int) -> Path:
    """The HR image folder an entry names: the folder itself, its ``HR`` child, or ``HR/X<s>`` (ClassSR)."""
    if not folder.is_dir() or list_images(folder):
        return folder
    if folder.name.upper() != "HR":
        children = [child for child in folder.iterdir() if child.is_dir() and child.name.upper() == "HR"]
        if not children:
            return folder
        folder = children[0]
        if list_images(folder):
            return folder
    per_scale = folder / f"X{scale}"
    if per_scale.is_dir():
        return per_scale
    present = sorted(child.name for child in folder.iterdir() if child.is_dir() and _SCALE_FOLDER.fullmatch(child.name))
    if present:
        raise DataError(
            f"HR folder {folder} has no X{scale} folder for data.scale={scale} (it holds {', '.join(present)}): "
            "set data.scale to one of those, or add the HR images of this scale"
        )
    return folder


def _set_name(hr_dir: Path) -> str:
    """Set name of an HR folder: the folder above ``HR`` (``Set5/HR``, ``Test2K/HR/X4``), else its own name."""
    resolved = hr_dir.resolve()
    if _is_per_scale_hr(resolved):
        return resolved.parent.parent.name
    if resolved.name.upper() in _HR_FOLDER_NAMES:
        return resolved.parent.name
    return resolved.name


def _shipped_lr_dir(hr_dir: Path, scale: int) -> Path:
    """Where a layout keeps its LR: ``<set>/LR/X<s>`` beside ClassSR's ``HR/X<s>``, else ``../LR_bicubic/X<s>``."""
    absolute = hr_dir.absolute()
    if _is_per_scale_hr(absolute):
        if int(_SCALE_FOLDER.fullmatch(absolute.name).group(1)) != scale:
            raise DataError(
                f"HR folder {hr_dir} holds the HR images of x{absolute.name[1:]} but data.scale is {scale}: "
                f"pass the set folder {absolute.parent.parent} (effsr then reads HR/X{scale} and LR/X{scale})"
            )
        return absolute.parent.parent / "LR" / f"X{scale}"
    return absolute.parent / "LR_bicubic" / f"X{scale}"


def _folder_source(entry: str, scale: int, lr_source: LRSource) -> tuple[str, list[PairSource]]:
    """(set name, pairs) of a folder entry: ``HR_DIR``, ``HR_DIR:LR_DIR`` or a benchmark layout.

    Benchmark layouts (the set folder, its ``HR`` folder or ClassSR's ``HR/X<s>`` may be given):
    EDSR/SMSR ``<set>/HR`` + ``<set>/LR_bicubic/X<s>``, ClassSR ``<set>/HR/X<s>`` + ``<set>/LR/X<s>``.
    """
    hr_text, _, lr_text = entry.partition(":") if ":" in entry and not Path(entry).exists() else (entry, "", "")
    hr_dir = _locate_hr(Path(hr_text).expanduser(), scale)
    if lr_text:
        lr_dir: Path | None = Path(lr_text).expanduser()
        if not lr_dir.is_dir():
            raise DataError(f"LR folder {lr_dir} (from {entry!r}) does not exist: fix the HR_DIR:LR_DIR entry")
        if lr_source == "generated":
            lr_dir = None
    else:
        lr_dir = _official_lr_dir(_shipped_lr_dir(hr_dir, scale), scale, lr_source, entry)
    return _set_name(hr_dir), pairs_from_folders(hr_dir, lr_dir, scale)


def _train_source(entry: str, data_root: str | None, scale: int, cache_dir: str | Path,
                  lr_source: LRSource) -> tuple[str, list[PairSource]]:
    """(name, pairs) of one training entry: sample | div2k | flickr2k | df2k | a folder of HR images."""
    key = entry.lower()
    if key == "sample":
        from effsr.data.sample import sample_dir

        return key, pairs_from_folders(sample_dir(cache_dir, "train"), None, scale)
    if key in ("div2k", "flickr2k"):
        return key, _named_source(key, data_root, scale, lr_source, "train")
    if key == "df2k":
        return key, [*_named_source("div2k", data_root, scale, lr_source, "train"),
                     *_named_source("flickr2k", data_root, scale, lr_source, "train")]
    return _folder_source(entry, scale, lr_source)


def resolve_train_sources(
    train: str | Sequence[str], data_root: str | None, scale: int, cache_dir: str | Path,
    lr_source: LRSource = "auto",
) -> list[PairSource]:
    """Training pairs of ``train``: one entry (sample | div2k | flickr2k | df2k | a folder) or a list of them.

    A list is the concatenation of its entries in the given order, so dataset indices (and ClassSR's
    sub-image indices) of the first entry stay those of that entry alone; names get a ``<entry name>/``
    prefix so equal file names in two folders stay apart. An image listed twice is an error.
    """
    check_data_scale(scale)
    if isinstance(train, str):
        return _train_source(train, data_root, scale, cache_dir, lr_source)[1]
    entries = list(train)
    if not entries:
        raise ConfigError("data.train is an empty list: give a data set (e.g. div2k) or a list of HR folders")
    pairs: list[PairSource] = []
    owners: dict[Path, str] = {}
    for entry in entries:
        try:
            name, entry_pairs = _train_source(entry, data_root, scale, cache_dir, lr_source)
        except DataError as error:
            raise DataError(f"data.train entry {entry!r}: {error}") from error
        for pair in entry_pairs:
            path = pair.hr_path.resolve()
            if path in owners:
                raise ConfigError(
                    f"data.train lists image {pair.hr_path} twice (in {owners[path]!r} and {entry!r}): "
                    "remove one of the entries (df2k already holds div2k and flickr2k)"
                )
            owners[path] = entry
        pairs += [replace(pair, name=f"{name}/{pair.name}") for pair in entry_pairs]
    return pairs


def resolve_eval_set(
    entry: str, data_root: str | None, scale: int, cache_dir: str | Path, lr_source: LRSource = "auto"
) -> tuple[str, list[PairSource]]:
    """(set name, pairs) of an eval entry: sample | div2k_valid | HR folder | HR_DIR:LR_DIR."""
    check_data_scale(scale)
    key = entry.lower()
    if key == "sample":
        from effsr.data.sample import sample_dir

        return "sample", pairs_from_folders(sample_dir(cache_dir, "heldout"), None, scale)
    if key == "div2k_valid":
        return "div2k_valid", _named_source("div2k", data_root, scale, lr_source, "valid")
    return _folder_source(entry, scale, lr_source)


def predict_paths(predict_path: str) -> list[Path]:
    """LR images to super-resolve: a single file or the images of a folder."""
    path = Path(predict_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        images = list_images(path)
        if images:
            return images
        raise DataError(f"predict folder {path} holds no images: put LR images ({', '.join(IMAGE_SUFFIXES)}) in it")
    raise DataError(f"data.predict_path {path} does not exist: give an LR image or a folder of LR images")
