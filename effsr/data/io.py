"""Reading and writing images as HxWx3 uint8 RGB arrays.

Conversions applied by :func:`read_image` (so every loader sees the same thing):

- grayscale (HxW or HxWx1) → RGB with R = G = B;
- grayscale + alpha → RGB (R = G = B), alpha dropped;
- RGBA / BGRA → RGB: the alpha channel is dropped WITHOUT compositing (the stored colour values are kept
  as they are, as BasicSR and MATLAB ``imread`` do), so results match the other SR toolboxes;
- 16-bit → 8-bit with ``round(v / 257)`` (65535 → 255, exact inverse of 8→16-bit expansion);
- palette PNGs are expanded to RGB by the decoder.

A file that cannot be decoded, is truncated (a PNG without its IEND chunk, a JPEG without its EOI
marker) or is not an image raises :class:`effsr.errors.DataError` naming the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from effsr.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has an image suffix effsr reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files ignored)."""
    return sorted(
        entry for entry in Path(folder).iterdir()
        if entry.is_file() and not entry.name.startswith(".") and is_image_file(entry)
    )


def _check_complete(path: Path, data: bytes) -> None:
    """Raises DataError when a PNG/JPEG byte stream is visibly truncated (decoders may not notice)."""
    advice = "re-download or re-export it, or remove it from the folder"
    if data.startswith(_PNG_SIGNATURE):
        if _PNG_IEND not in data[-64:]:
            raise DataError(f"image {path} is truncated (PNG has no IEND chunk): {advice}")
    elif data.startswith(b"\xff\xd8"):
        if b"\xff\xd9" not in data[-64:]:
            raise DataError(f"image {path} is truncated (JPEG has no end-of-image marker): {advice}")


def to_rgb_uint8(image: np.ndarray, path: str | os.PathLike[str] = "<array>", bgr: bool = True) -> np.ndarray:
    """Converts a decoded array (gray / gray+alpha / BGR(A) / RGB(A), 8 or 16 bit) to HxWx3 uint8 RGB."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        raise DataError(
            f"image {path} has pixel type {image.dtype}; effsr reads 8- or 16-bit images: convert it to 8-bit PNG"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim != 3 or image.shape[2] not in (2, 3, 4):
        raise DataError(f"image {path} has shape {image.shape}; expected a grayscale, RGB or RGBA image")
    if image.shape[2] == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, :1], 3, axis=2))
    colour = image[:, :, :3]
    if bgr:
        colour = colour[:, :, ::-1]
    return np.ascontiguousarray(colour)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an image file as an HxWx3 uint8 RGB array (conversions in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist (or is not a file): check the path")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"image {path} cannot be read ({error}): check its permissions") from error
    if not data:
        raise DataError(f"image {path} is empty (0 bytes): re-download it or remove it from the folder")
    _check_complete(path, data)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise DataError(
            f"image {path} cannot be decoded (corrupt or not an image): re-download it or remove it from the folder"
        )
    return to_rgb_uint8(decoded, path)


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Writes an HxWx3 (or HxW) uint8 RGB array atomically (temporary file + rename); format from the suffix."""
    path = Path(path)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise DataError(f"write_image({path}) expects an HxWx3 uint8 array, got {image.dtype} {image.shape}")
    suffix = path.suffix.lower() or ".png"
    bgr = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    ok, encoded = cv2.imencode(suffix, bgr)
    if not ok:
        raise DataError(f"cannot encode {path} as {suffix}: use .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(encoded.tobytes())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
