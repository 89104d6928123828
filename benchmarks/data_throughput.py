"""Training-sample throughput per core: LR 48 / HR 192 pairs with D4 augmentation, ready to collate.

Generates N 2040x1356 PNGs (scikit-image photographs upscaled with the MATLAB bicubic plus a noise
texture, so PNG decoding costs what a DIV2K image costs) and their x4 LR PNGs, then times one process
with one thread:

(a) ``decode_per_sample``: decode the 2K HR PNG and its LR PNG for every sample;
(b) ``basicsr_subimages``: BasicSR's way, 480x480 HR sub-images (step 240) and their 120x120 LR
    sub-images written once as PNGs (compression 3, as BasicSR's extract_subimages), decoded per sample;
(c) ``effsr_cache``: effsr's decoded-array cache (memory-mapped .npy) through ``RandomPatchDataset``.

All three crop on the LR grid and use the same albumentations D4 and uint8 CHW tensors, so only the
source differs. The last line is ``cached_vs_basicsr=X.X``.

Usage: python benchmarks/data_throughput.py [--images 6] [--seconds 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

from effsr.data.augment import DihedralAugment
from effsr.data.cache import ArrayCache, PairSource
from effsr.data.datasets import RandomPatchDataset, to_chw_tensor
from effsr.data.io import list_images, read_image
from effsr.data.samplers import SampleKey
from effsr.ops.imresize import bicubic_degrade, imresize

SCALE, LR_PATCH, HR_SIZE, HR_WIDTH = 4, 48, 1356, 2040
SUB_SIZE, SUB_STEP = 480, 240
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_images(folder: Path, count: int) -> tuple[list[Path], list[Path]]:
    """Writes ``count`` HR 2040x1356 PNGs and their x4 MATLAB-bicubic LR PNGs (reused when present)."""
    hr_dir, lr_dir = folder / "HR", folder / "LR"
    hr_dir.mkdir(parents=True, exist_ok=True)
    lr_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for number in range(count):
        hr_path, lr_path = hr_dir / f"{number:04d}.png", lr_dir / f"{number:04d}x{SCALE}.png"
        if hr_path.is_file() and lr_path.is_file():
            continue
        photo = torch.from_numpy(getattr(data, PHOTOS[number % len(PHOTOS)])()).permute(2, 0, 1).double()
        large = imresize(photo, output_size=(HR_SIZE, HR_WIDTH)).permute(1, 2, 0).numpy()
        large = large + rng.normal(0.0, 4.0, large.shape)
        hr = np.clip(np.round(large), 0, 255).astype(np.uint8)
        hr, lr = bicubic_degrade(hr, SCALE)
        cv2.imwrite(str(hr_path), hr[:, :, ::-1])
        cv2.imwrite(str(lr_path), lr[:, :, ::-1])
    return list_images(hr_dir), list_images(lr_dir)


def positions(length: int, size: int, step: int) -> list[int]:
    """BasicSR's extract_subimages starts (thresh_size 0)."""
    starts = list(range(0, length - size + 1, step))
    if length - (starts[-1] + size) > 0:
        starts.append(length - size)
    return starts


def make_subimages(folder: Path, hr_paths: list[Path], lr_paths: list[Path]) -> list[tuple[Path, Path]]:
    """BasicSR's 480x480 (LR 120x120) sub-image PNGs, written once."""
    out = folder / "sub"
    out.mkdir(exist_ok=True)
    pairs = []
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for hr_path, lr_path in zip(hr_paths, lr_paths, strict=True):
        hr = cv2.imread(str(hr_path), cv2.IMREAD_UNCHANGED)
        lr = cv2.imread(str(lr_path), cv2.IMREAD_UNCHANGED)
        tops, lefts = positions(hr.shape[0], SUB_SIZE, SUB_STEP), positions(hr.shape[1], SUB_SIZE, SUB_STEP)
        for index, (top, left) in enumerate((y, x) for y in tops for x in lefts):
            hr_sub, lr_sub = out / f"{hr_path.stem}_s{index:03d}.png", out / f"{hr_path.stem}_s{index:03d}x4.png"
            if not hr_sub.is_file():
                cv2.imwrite(str(hr_sub), hr[top : top + SUB_SIZE, left : left + SUB_SIZE], params)
                lr_top, lr_left, lr_size = top // SCALE, left // SCALE, SUB_SIZE // SCALE
                cv2.imwrite(str(lr_sub), lr[lr_top : lr_top + lr_size, lr_left : lr_left + lr_size], params)
            pairs.append((hr_sub, lr_sub))
    return pairs


def decoded_sampler(pairs: list[tuple[Path, Path]]) -> Callable[[int], dict[str, torch.Tensor]]:
    """A sample function that decodes an (HR, LR) PNG pair, crops on the LR grid and applies D4."""
    augment = DihedralAugment()
    rng = random.Random(0)

    def sample(index: int) -> dict[str, torch.Tensor]:
        hr_path, lr_path = pairs[rng.randrange(len(pairs))]
        hr, lr = read_image(hr_path), read_image(lr_path)
        top = rng.randrange(lr.shape[0] - LR_PATCH + 1)
        left = rng.randrange(lr.shape[1] - LR_PATCH + 1)
        lr = lr[top : top + LR_PATCH, left : left + LR_PATCH]
        hr = hr[top * SCALE : (top + LR_PATCH) * SCALE, left * SCALE : (left + LR_PATCH) * SCALE]
        lr, hr = augment(lr, hr, rng.randrange(8))
        return {"lr": to_chw_tensor(lr), "hr": to_chw_tensor(hr), "index": torch.tensor(index)}

    return sample


def rate(sample: Callable[[int], dict[str, torch.Tensor]], seconds: float) -> float:
    """Samples per second over about ``seconds`` (after a short warm-up)."""
    for index in range(3):
        sample(index)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            out = sample(count)
            assert out["hr"].shape == (3, LR_PATCH * SCALE, LR_PATCH * SCALE)
            count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="number of 2040x1356 images to generate")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing duration per method")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the images (default: a temp dir)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="effsr_throughput_"))
    start = time.perf_counter()
    hr_paths, lr_paths = make_images(workdir, args.images)
    print(f"images: {len(hr_paths)} x 2040x1356 PNG in {workdir} ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    subimages = make_subimages(workdir, hr_paths, lr_paths)
    print(f"basicsr sub-images: {len(subimages)} x 480x480 PNG ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    cache = ArrayCache(workdir / "cache", SCALE)
    entries = cache.build_all([PairSource(h.stem, h, l) for h, l in zip(hr_paths, lr_paths, strict=True)])
    dataset = RandomPatchDataset(entries, SCALE, LR_PATCH, seed=0)
    print(f"effsr cache: {len(entries)} images decoded ({time.perf_counter() - start:.1f} s, one-off)")
    print("per core (1 process, 1 thread), LR 48 / HR 192 + D4, samples/s:")
    whole = rate(decoded_sampler(list(zip(hr_paths, lr_paths, strict=True))), args.seconds)
    print(f"(a) decode_per_sample={whole:.1f}")
    basicsr = rate(decoded_sampler(subimages), args.seconds)
    print(f"(b) basicsr_subimages={basicsr:.1f}")
    sizes = len(dataset)
    cached = rate(lambda index: dataset[SampleKey(0, index, index % sizes)], args.seconds)
    print(f"(c) effsr_cache={cached:.1f}")
    print(f"cached_vs_basicsr={cached / basicsr:.1f}")


if __name__ == "__main__":
    main()
