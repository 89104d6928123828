"""Decoded-array cache: every training/evaluation image decoded once into uint8 ``.npy`` files.

Decoding a 2K PNG costs ~70 ms; cropping a patch out of a memory-mapped ``.npy`` costs microseconds. Each
(HR, LR) pair is stored as two files ``<cache_dir>/arrays/x<scale>/<stem>-<path hash>-<fingerprint>.{hr,lr}.npy``:

- HR is mod-cropped to the scale (after the optional MATLAB-bicubic rescale used by ClassSR);
- LR is the official LR file when the source has one, otherwise the MATLAB-compatible bicubic of that HR
  (``effsr.ops.imresize.bicubic_degrade``), never another kernel;
- the fingerprint hashes the source files' (absolute path, size, mtime), the scale, the rescale factor and
  the LR method, so a changed source gets a new entry (the stale one is deleted when the new one is built);
- files are written to a temporary name and renamed, so an interrupted build never leaves a half file.

The default folder is ``$EFFSR_CACHE`` or ``~/.cache/effsr``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effsr.data.io import read_image
from effsr.errors import DataError

CACHE_VERSION = 1
GENERATED_LR_METHOD = "matlab_bicubic"


def default_cache_dir() -> Path:
    """``$EFFSR_CACHE`` when set, else ``~/.cache/effsr``."""
    return Path(os.environ.get("EFFSR_CACHE") or Path.home() / ".cache" / "effsr")


@dataclass(frozen=True)
class PairSource:
    """One HR image and, when the data set ships one, its official LR file."""

    name: str
    hr_path: Path
    lr_path: Path | None = None


@dataclass(frozen=True)
class CachedPair:
    """Where the decoded arrays of one (possibly rescaled) pair live."""

    source: PairSource
    rescale: float
    hr_file: Path
    lr_file: Path

    @property
    def name(self) -> str:
        """Image name, with the rescale factor appended when it is not 1."""
        return self.source.name if self.rescale == 1.0 else f"{self.source.name}@{self.rescale:g}"

    def is_built(self) -> bool:
        """True when both array files exist."""
        return self.hr_file.is_file() and self.lr_file.is_file()

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(hr, lr) as read-only memory maps (HxWx3 uint8)."""
        try:
            return np.load(self.hr_file, mmap_mode="r"), np.load(self.lr_file, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise DataError(
                f"cache entry {self.hr_file} is unreadable ({error}): delete it and run `effsr data prepare` again"
            ) from error


def _stat_key(path: Path | None) -> list[object] | None:
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"image {path} cannot be accessed ({error}): check the data folder") from error
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_pair(source: PairSource, scale: int, rescale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a source into (HR mod-cropped, LR) uint8 arrays; checks official LR sizes."""
    from effsr.ops.imresize import bicubic_degrade, imresize_uint8, mod_crop

    hr = read_image(source.hr_path)
    if rescale != 1.0:
        hr = imresize_uint8(hr, rescale)
    if source.lr_path is None or rescale != 1.0:
        return bicubic_degrade(hr, scale)
    hr = mod_crop(hr, scale)
    lr = read_image(source.lr_path)
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    if lr.shape[:2] != expected:
        raise DataError(
            f"LR/HR size mismatch: {source.lr_path} is {lr.shape[1]}x{lr.shape[0]} but {source.hr_path} "
            f"(mod-cropped to {hr.shape[1]}x{hr.shape[0]}) needs {expected[1]}x{expected[0]} at x{scale}: "
            "check the scale and that the LR folder belongs to this HR folder"
        )
    return hr, lr


class ArrayCache:
    """Builds and finds decoded (HR, LR) arrays for one scale under ``cache_dir``."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None, scale: int) -> None:
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.scale = scale
        self.folder = self.root / "arrays" / f"x{scale}"

    def entry(self, source: PairSource, rescale: float = 1.0) -> CachedPair:
        """The cache entry of a source (not built yet if ``is_built()`` is False)."""
        method = "official" if source.lr_path is not None and rescale == 1.0 else GENERATED_LR_METHOD
        key = json.dumps(
            [CACHE_VERSION, _stat_key(source.hr_path), _stat_key(source.lr_path) if method == "official" else None,
             self.scale, float(rescale), method]
        )
        fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
        path_hash = hashlib.sha1(str(source.hr_path.resolve()).encode()).hexdigest()[:8]
        stem = f"{_safe_stem(source.hr_path.stem)}-{path_hash}-r{rescale:g}"
        base = self.folder / f"{stem}-{fingerprint}"
        return CachedPair(source, float(rescale), Path(f"{base}.hr.npy"), Path(f"{base}.lr.npy"))

    def build(self, entry: CachedPair) -> CachedPair:
        """Decodes the source into the entry's files unless they exist; removes stale versions."""
        if entry.is_built():
            return entry
        self.folder.mkdir(parents=True, exist_ok=True)
        hr, lr = make_pair(entry.source, self.scale, entry.rescale)
        _save_atomic(entry.lr_file, lr)
        _save_atomic(entry.hr_file, hr)
        prefix = entry.hr_file.name.rsplit("-", 1)[0]
        for stale in self.folder.glob(f"{prefix}-*.npy"):
            if stale not in (entry.hr_file, entry.lr_file):
                stale.unlink(missing_ok=True)
        return entry

    def build_all(
        self,
        sources: Sequence[PairSource],
        rescales: Sequence[float] = (1.0,),
        workers: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[CachedPair]:
        """Entries of every (source, rescale), building the missing ones with ``workers`` threads."""
        entries = [self.entry(source, rescale) for source in sources for rescale in rescales]
        missing = [entry for entry in entries if not entry.is_built()]
        if missing:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for done, _ in enumerate(pool.map(self.build, missing), start=1):
                    if progress is not None:
                        progress(done, len(missing))
        return entries
