"""Data sources: which HR images (and which official LR files) a data option names.

Layouts (``resolve_train_sources`` / ``resolve_eval_set``), as in conventions.md:

- ``div2k``: ``<root>/DIV2K/DIV2K_train_HR/0001.png``, official LR ``DIV2K_train_LR_bicubic/X<s>/0001x<s>.png``;
- ``flickr2k``: ``<root>/Flickr2K/Flickr2K_HR/000001.png``, ``Flickr2K_LR_bicubic/X<s>/000001x<s>.png``;
- ``df2k``: both; ``sample``: the scikit-image photographs (``effsr.data.sample``);
- any folder of HR images, optionally ``HR_DIR:LR_DIR``; an ``HR`` folder next to ``LR_bicubic/X<s>`` uses
  that LR folder (EDSR's benchmark layout). LR files are ``<stem>x<s>.<ext>`` or ``<stem>.<ext>``.
- eval only: ``div2k_valid`` (``DIV2K_valid_HR``, 0801–0900).

Official LR is used when its folder exists (``lr_source="auto"``); otherwise LR is generated with the
MATLAB-compatible bicubic and cached (``effsr.data.cache``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


def check_scale(scale: int) -> None:
    """Raises ConfigError unless ``scale`` is an integer ≥ 2."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ConfigError(f"data.scale must be an integer >= 2 (got {scale!r}): use 2, 3 or 4 for the standard sets")


# ----------------------------------------------------------------------------------------------- sources
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
        f"{hr_path.stem}.png): add it, or remove the LR folder so LR is generated"
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


def _folder_source(entry: str, scale: int, lr_source: LRSource) -> tuple[str, list[PairSource]]:
    """(set name, pairs) of a folder entry: ``HR_DIR``, ``HR_DIR:LR_DIR`` or an ``HR`` + ``LR_bicubic`` layout."""
    hr_text, _, lr_text = entry.partition(":") if ":" in entry and not Path(entry).exists() else (entry, "", "")
    hr_dir = Path(hr_text).expanduser()
    name = hr_dir.resolve().name
    if lr_text:
        lr_dir: Path | None = Path(lr_text).expanduser()
        if not lr_dir.is_dir():
            raise DataError(f"LR folder {lr_dir} (from {entry!r}) does not exist: fix the HR_DIR:LR_DIR entry")
        if lr_source == "generated":
            lr_dir = None
    else:
        lr_dir = _official_lr_dir(hr_dir.parent / "LR_bicubic" / f"X{scale}", scale, lr_source, entry)
    if hr_dir.name.upper() in ("HR", "GT", "GTMOD12"):
        name = hr_dir.resolve().parent.name
    return name, pairs_from_folders(hr_dir, lr_dir, scale)


def resolve_train_sources(
    train: str, data_root: str | None, scale: int, cache_dir: str | Path, lr_source: LRSource = "auto"
) -> list[PairSource]:
    """Training pairs of ``train``: sample | div2k | flickr2k | df2k | a folder of HR images."""
    check_scale(scale)
    key = train.lower()
    if key == "sample":
        from effsr.data.sample import sample_dir

        return pairs_from_folders(sample_dir(cache_dir, "train"), None, scale)
    if key in ("div2k", "flickr2k"):
        return _named_source(key, data_root, scale, lr_source, "train")
    if key == "df2k":
        return [*_named_source("div2k", data_root, scale, lr_source, "train"),
                *_named_source("flickr2k", data_root, scale, lr_source, "train")]
    return _folder_source(train, scale, lr_source)[1]


def resolve_eval_set(
    entry: str, data_root: str | None, scale: int, cache_dir: str | Path, lr_source: LRSource = "auto"
) -> tuple[str, list[PairSource]]:
    """(set name, pairs) of an eval entry: sample | div2k_valid | HR folder | HR_DIR:LR_DIR."""
    check_scale(scale)
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
