"""``effsr data download``: official DIV2K / Flickr2K archives, verified, resumable, extracted safely.

- Downloads go to ``<root>/downloads/<file>.part`` and resume with an HTTP ``Range`` request after an
  interruption (also across runs); a file is renamed to its final name only after its size and SHA-256
  match the checksum table below. A mismatch deletes the partial file and raises DataError.
- Checksums: DIV2K sizes/SHA-256 as recorded by TensorFlow Datasets (``url_checksums/div2k.txt``).
  Flickr2K has no published checksum: ``sha256=None`` there means only the HTTP length is checked (the
  download prints the SHA-256 it computed so you can pin it).
- Extraction follows docs/protocol.md (``<root>/DIV2K/DIV2K_train_HR/...``, ``<root>/Flickr2K/Flickr2K_HR/...``);
  members whose path would land outside the target folder (absolute, ``..``, links) are refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from effsr.errors import ConfigError, DataError

DIV2K_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K"
FLICKR2K_URL = "https://cv.snu.ac.kr/research/EDSR/Flickr2K.tar"


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: URL, expected size and SHA-256 (None: unknown), folder under root."""

    url: str
    size: int | None
    sha256: str | None
    subdir: str

    @property
    def filename(self) -> str:
        """File name of the archive."""
        return self.url.rsplit("/", 1)[-1]


_DIV2K_CHECKSUMS: dict[str, tuple[int, str]] = {
    "DIV2K_train_HR.zip": (3530603713, "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335"),
    "DIV2K_valid_HR.zip": (448993893, "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc"),
    "DIV2K_train_LR_bicubic_X2.zip": (925390592, "a53a424317575838dadce4bcd97cf7b744d6855f43740ed5f0245af3cf4bd850"),
    "DIV2K_train_LR_bicubic_X3.zip": (427847282, "ad5c8e5507e2765823d3c2c5bd0934842efcd487c5370604c224090898b3163a"),
    "DIV2K_train_LR_bicubic_X4.zip": (246914039, "f006b837f4eb52b82909aa01478e6d6d199eefce932179491d0c9dbb706dde3a"),
    "DIV2K_valid_LR_bicubic_X2.zip": (117763600, "60eed9875c697df51204aa579e2a699e1d5215095788a097ff54dd17e2664d57"),
    "DIV2K_valid_LR_bicubic_X3.zip": (54513392, "04b9a2ed3b4a0715d3924d3ae8514830c3328fac8d30512ce716d6f419e052a3"),
    "DIV2K_valid_LR_bicubic_X4.zip": (31505881, "a50a5d1c4b88de4e8d300d8fb2b904c52fe93b2b298a4899697760d7cbb6d553"),
}


def dataset_archives(name: str, scales: Sequence[int] = (2, 3, 4), lr: bool = True) -> list[Archive]:
    """The archives of ``div2k`` (HR train/valid + official bicubic LR of ``scales``) or ``flickr2k``."""
    if name == "flickr2k":
        return [Archive(FLICKR2K_URL, None, None, ".")]
    if name != "div2k":
        raise ConfigError(f"unknown data set {name!r} to download: use div2k or flickr2k")
    bad = [scale for scale in scales if scale not in (2, 3, 4)]
    if bad:
        raise ConfigError(f"DIV2K ships bicubic LR for x2, x3, x4 only, not {bad}: generated LR needs no download")
    files = ["DIV2K_train_HR.zip", "DIV2K_valid_HR.zip"]
    if lr:
        files += [f"DIV2K_{split}_LR_bicubic_X{scale}.zip" for scale in scales for split in ("train", "valid")]
    return [Archive(f"{DIV2K_URL}/{file}", *_DIV2K_CHECKSUMS[file], "DIV2K") for file in files]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Appends the rest of ``url`` to ``part`` (HTTP Range from its current size)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            return
        raise
    with response:
        mode = "ab" if offset and response.status == 206 else "wb"
        total = response.headers.get("Content-Length")
        with part.open(mode) as stream:
            received = 0
            while block := response.read(1 << 20):
                stream.write(block)
                received += len(block)
        if total is not None and received < int(total):
            raise ConnectionError(f"connection closed after {received} of {total} bytes")


def download_file(
    archive: Archive, folder: Path, retries: int = 5, timeout: float = 60.0, retry_delay: float = 2.0
) -> Path:
    """Downloads ``archive`` into ``folder`` (resuming a ``.part`` file), verifies it, returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / archive.filename, folder / f"{archive.filename}.part"
    if target.is_file():
        return target
    for attempt in range(1, retries + 1):
        try:
            _fetch(archive.url, part, timeout)
            break
        except (OSError, urllib.error.URLError) as error:
            if isinstance(error, urllib.error.HTTPError) and error.code in (403, 404):
                raise DataError(f"{archive.url} answered {error.code}: the URL may have moved; "
                                "download it by hand into " + str(folder)) from error
            if attempt == retries:
                raise DataError(
                    f"downloading {archive.url} failed {retries} times ({error}); run the command again to resume "
                    f"from {part}"
                ) from error
            print(f"effsr data: {archive.filename}: {error}; resuming (attempt {attempt + 1})", file=sys.stderr)
            time.sleep(min(retry_delay * attempt, 30.0))
    size = part.stat().st_size
    if archive.size is not None and size != archive.size:
        if size > archive.size:
            part.unlink()
        raise DataError(f"{archive.filename}: got {size} bytes, expected {archive.size}; run the command again"
                        + (" (the partial file was removed)" if not part.exists() else " to resume"))
    digest = _sha256(part)
    if archive.sha256 is not None and digest != archive.sha256:
        part.unlink()
        raise DataError(
            f"{archive.filename}: SHA-256 {digest} does not match the expected {archive.sha256}; the corrupt "
            "download was deleted: run the command again (or check the mirror)"
        )
    if archive.sha256 is None:
        print(f"effsr data: {archive.filename}: no published checksum; its SHA-256 is {digest}", file=sys.stderr)
    os.replace(part, target)
    return target


def _safe_target(destination: Path, member: str) -> Path:
    relative = PurePosixPath(member.replace("\\", "/"))
    target = (destination / relative).resolve()
    if relative.is_absolute() or ".." in relative.parts or not target.is_relative_to(destination.resolve()):
        raise DataError(f"archive member {member!r} would be written outside {destination}: archive refused")
    return target


def extract_archive(archive: Path, destination: Path) -> None:
    """Extracts a zip or tar archive into ``destination``, refusing members that would land outside it."""
    destination.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _safe_target(destination, info.filename)
            bundle.extractall(destination)
        return
    try:
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _safe_target(destination, member.name)
                if member.issym() or member.islnk() or member.isdev():
                    raise DataError(f"archive member {member.name!r} of {archive} is a link or device: refused")
            bundle.extractall(destination, members=members, filter="data")
    except tarfile.TarError as error:
        raise DataError(
            f"{archive} is not a readable zip or tar archive ({error}): delete it and download again"
        ) from error


def download_dataset(
    name: str, root: str | Path, scales: Sequence[int] = (2, 3, 4), lr: bool = True, mirror: str | None = None,
    keep_archives: bool = True, retries: int = 5, timeout: float = 60.0,
) -> Path:
    """Downloads and extracts ``div2k`` or ``flickr2k`` under ``root``; ``mirror`` replaces the URL folder."""
    root = Path(root).expanduser()
    downloads = root / "downloads"
    for archive in dataset_archives(name, scales, lr):
        if mirror:
            archive = replace(archive, url=f"{mirror.rstrip('/')}/{archive.filename}")
        marker = root / archive.subdir / f".extracted-{archive.filename}"
        if marker.is_file():
            print(f"effsr data: {archive.filename} already extracted", file=sys.stderr)
            continue
        print(f"effsr data: downloading {archive.url}", file=sys.stderr)
        path = download_file(archive, downloads, retries=retries, timeout=timeout)
        print(f"effsr data: extracting {path.name} into {root / archive.subdir}", file=sys.stderr)
        extract_archive(path, root / archive.subdir)
        marker.write_text(archive.sha256 or "")
        if not keep_archives:
            path.unlink()
    return root
