"""Bicubic baseline table (docs/protocol.md): HR mod-crop, MATLAB-bicubic LR (uint8), bicubic back, Y metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from effsr.errors import DataError
from effsr.metrics import psnr, ssim
from effsr.ops import bicubic_degrade, imresize


def read_rgb(path: Path) -> np.ndarray:
    """Reads an image as uint8 RGB (grayscale -> R=G=B, alpha dropped)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"cannot read image {path}; check the file is a valid PNG/JPEG")
    if image.dtype == np.uint16:
        image = np.round(image / 257.0).astype(np.uint8)
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def evaluate_folder(folder: Path, scale: int) -> tuple[float, float, int]:
    """Mean per-image Y-PSNR / Y-SSIM of bicubic ×scale on the HR images of ``folder``."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not paths:
        raise DataError(f"no images in --hr-dir {folder}; expected a folder of HR PNG/JPEG files")
    psnrs, ssims = [], []
    for path in paths:
        hr, lr = bicubic_degrade(read_rgb(path), scale)
        lr_tensor = torch.from_numpy(lr).permute(2, 0, 1)[None].to(torch.float64) / 255.0
        hr_tensor = torch.from_numpy(hr).permute(2, 0, 1)[None].to(torch.float64) / 255.0
        sr_tensor = imresize(lr_tensor, scale=scale)
        psnrs.append(psnr(sr_tensor, hr_tensor, crop_border=scale).item())
        ssims.append(ssim(sr_tensor, hr_tensor, crop_border=scale).item())
    return float(np.mean(psnrs)), float(np.mean(ssims)), len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hr-dir", nargs="+", required=True, type=Path, help="folders of HR images (set = name)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--all-scales", action="store_true", help="run x2, x3 and x4")
    args = parser.parse_args()
    scales = [2, 3, 4] if args.all_scales else [args.scale]
    print("| set | scale | images | PSNR-Y | SSIM-Y |")
    print("|---|---|---|---|---|")
    for folder in args.hr_dir:
        if not folder.is_dir():
            raise DataError(f"--hr-dir {folder} is not a folder; pass folders of HR images")
        for scale in scales:
            mean_psnr, mean_ssim, count = evaluate_folder(folder, scale)
            print(f"| {folder.name} | x{scale} | {count} | {mean_psnr:.2f} | {mean_ssim:.4f} |")


if __name__ == "__main__":
    main()
