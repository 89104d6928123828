"""Tiled and routed inference: the one implementation every method uses for large images.

An LR image is cut into ``patch_size`` tiles on a grid of stride ``patch_size - overlap`` that covers the
WHOLE image (a last tile flush with the right/bottom edge is added where the grid does not reach it; the
official ClassSR code drops that remainder). Tiles run in batches and are stitched back:

* ``blend="crop"``: each output pixel comes from the tile in which it lies farthest from a cut edge
  (every tile gives up ``overlap // 2`` LR pixels on sides that border another tile). For a network whose
  receptive radius is ≤ ``overlap // 2`` LR pixels (zero padding), the result equals whole-image inference
  exactly; otherwise pixels within (radius − overlap//2) of a cut differ by the network's boundary effect.
* ``blend="average"``: overlapping outputs are averaged (ClassSR's protocol).

Memory is bounded by the output image, one weight plane, and ``batch_size`` tiles, so 8K outputs fit on
a 24 GiB CPU machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effsr.inference.deploy import deployed

Network = Callable[[Tensor], Tensor]


def _axis_starts(length: int, patch_size: int, stride: int) -> list[int]:
    if length <= patch_size:
        return [0]
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] + patch_size < length:
        starts.append(length - patch_size)
    return starts


def tile_grid(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of tiles covering a ``height``×``width`` image, row-major."""
    if stride <= 0 or stride > patch_size:
        raise ValueError(f"tile stride must be in 1..patch_size ({patch_size}), got {stride}")
    return [(y, x) for y in _axis_starts(height, patch_size, stride) for x in _axis_starts(width, patch_size, stride)]


def _pad_to_patch(lr: Tensor, patch_size: int) -> tuple[Tensor, int, int]:
    height, width = lr.shape[-2:]
    pad_bottom, pad_right = max(0, patch_size - height), max(0, patch_size - width)
    if pad_bottom or pad_right:
        lr = F.pad(lr, (0, pad_right, 0, pad_bottom), mode="replicate")
    return lr, height, width


def _crop_window(start: int, patch_size: int, image_length: int, starts: list[int]) -> tuple[int, int]:
    """LR range [lo, hi) of one tile that the 'crop' blend keeps: the middle of each overlap is the seam."""
    index = starts.index(start)
    lo = start if index == 0 else (starts[index - 1] + patch_size + start) // 2
    hi = start + patch_size if index == len(starts) - 1 else (start + patch_size + starts[index + 1]) // 2
    return max(lo, 0), min(hi, image_length)


class _Stitcher:
    """Accumulates tile outputs into the full SR image."""

    def __init__(self, lr: Tensor, scale: int, patch_height: int, patch_width: int, overlap: int,
                 blend: Literal["crop", "average"]) -> None:
        self.scale, self.overlap, self.blend = scale, overlap, blend
        self.patch_height, self.patch_width = patch_height, patch_width
        batch, channels, self.height, self.width = lr.shape
        self.output = lr.new_zeros(batch, channels, self.height * scale, self.width * scale)
        self.weight = lr.new_zeros(1, 1, self.height * scale, self.width * scale) if blend == "average" else None
        self.row_starts = _axis_starts(self.height, patch_height, max(1, patch_height - overlap))
        self.col_starts = _axis_starts(self.width, patch_width, max(1, patch_width - overlap))

    @property
    def corners(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.row_starts for x in self.col_starts]

    def add(self, y: int, x: int, sr_tile: Tensor) -> None:
        s = self.scale
        valid_h, valid_w = min(self.patch_height, self.height - y), min(self.patch_width, self.width - x)
        sr_tile = sr_tile[..., : valid_h * s, : valid_w * s]
        if self.weight is not None:
            self.output[..., y * s:(y + valid_h) * s, x * s:(x + valid_w) * s] += sr_tile
            self.weight[..., y * s:(y + valid_h) * s, x * s:(x + valid_w) * s] += 1
            return
        top, bottom = _crop_window(y, self.patch_height, self.height, self.row_starts)
        left, right = _crop_window(x, self.patch_width, self.width, self.col_starts)
        self.output[..., top * s:bottom * s, left * s:right * s] = sr_tile[
            ..., (top - y) * s:(bottom - y) * s, (left - x) * s:(right - x) * s
        ]

    def result(self) -> Tensor:
        if self.weight is not None:
            return self.output / self.weight
        return self.output


def _extract(lr: Tensor, corners: Sequence[tuple[int, int]], patch_height: int, patch_width: int) -> Tensor:
    return torch.cat([lr[..., y:y + patch_height, x:x + patch_width] for y, x in corners], dim=0)


@torch.no_grad()
def tiled_forward(
    lr: Tensor,
    network: Network,
    scale: int,
    patch_size: int = 64,
    overlap: int = 8,
    batch_size: int = 16,
    blend: Literal["crop", "average"] = "crop",
) -> Tensor:
    """Runs ``network`` over overlapping LR tiles of a (1, C, H, W) image and stitches the SR output."""
    if lr.shape[0] != 1:
        return torch.cat([tiled_forward(image[None], network, scale, patch_size, overlap, batch_size, blend)
                          for image in lr])
    # An axis shorter than the tile is processed whole (padding would change what the network sees).
    patch_height, patch_width = min(patch_size, lr.shape[-2]), min(patch_size, lr.shape[-1])
    stitcher = _Stitcher(lr, scale, patch_height, patch_width, overlap, blend)
    corners = stitcher.corners
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        outputs = network(_extract(lr, chunk, patch_height, patch_width))
        for (y, x), output in zip(chunk, outputs, strict=True):
            stitcher.add(y, x, output[None])
    return stitcher.result()


@dataclass
class RoutedOutput:
    """Result of :func:`routed_forward`."""

    sr: Tensor
    route_map: Tensor
    corners: list[tuple[int, int]]
    patches_per_network: Tensor
    macs: int | None = None

    @property
    def proportions(self) -> Tensor:
        return self.patches_per_network.double() / max(1, int(self.patches_per_network.sum()))


def grid_patches(lr: Tensor, row_starts: Sequence[int], col_starts: Sequence[int], patch_size: int) -> Tensor:
    """All patches of a (1, C, H, W) image on a product grid, row-major, as one (R·Cc, C, p, p) gather."""
    offsets = torch.arange(patch_size, device=lr.device)
    rows = torch.as_tensor(list(row_starts), device=lr.device)[:, None] + offsets
    cols = torch.as_tensor(list(col_starts), device=lr.device)[:, None] + offsets
    patches = lr[0][:, rows[:, None, :, None], cols[None, :, None, :]]
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, lr.shape[1], patch_size, patch_size)


class _AverageStitcher:
    """Overlap-averaging stitcher for a product grid: ``index_add_`` of whole batches, separable weights."""

    def __init__(self, lr: Tensor, scale: int, patch_size: int, row_starts: Sequence[int],
                 col_starts: Sequence[int]) -> None:
        _, channels, height, width = lr.shape
        self.size = patch_size * scale
        self.width = width * scale
        self.output = lr.new_zeros(channels, height * scale * self.width)
        rows = torch.as_tensor(list(row_starts), device=lr.device) * scale
        cols = torch.as_tensor(list(col_starts), device=lr.device) * scale
        self.bases = (rows[:, None] * self.width + cols[None, :]).reshape(-1)
        offsets = torch.arange(self.size, device=lr.device)
        self.local = (offsets[:, None] * self.width + offsets[None, :]).reshape(-1)
        row_cover = torch.zeros(height * scale, device=lr.device, dtype=lr.dtype)
        col_cover = torch.zeros(self.width, device=lr.device, dtype=lr.dtype)
        for start in rows.tolist():
            row_cover[start:start + self.size] += 1
        for start in cols.tolist():
            col_cover[start:start + self.size] += 1
        self.weight = row_cover[:, None] * col_cover[None, :]

    def add(self, patch_indices: Tensor, sr_patches: Tensor) -> None:
        """Adds SR patches (n, C, p·s, p·s) of grid positions ``patch_indices`` (n,)."""
        index = (self.bases[patch_indices][:, None] + self.local[None, :]).reshape(-1)
        values = sr_patches.permute(1, 0, 2, 3).reshape(sr_patches.shape[1], -1)
        self.output.index_add_(1, index, values.to(self.output.dtype))

    def result(self) -> Tensor:
        channels = self.output.shape[0]
        return (self.output.view(channels, -1, self.width) / self.weight)[None]


CPU_ROUTE_BATCH = 4
"""Patches per call of :func:`routed_forward` on CPU. A ×4 branch's HR activations are F·128²·4 bytes per
32×32 LR patch (2.4 MB at F = 36), so 64 patches stream ~150 MB per layer through DRAM and narrow branches,
with the fewest MACs per byte, run at the lowest rate; 4 keep a layer's input and output in the L3 cache. Measured
(docs/classsr.md, "Routed inference speed"): the narrow branch 29 % and the wide one 15 % faster than at 64."""
ACCELERATOR_ROUTE_BATCH = 64


def route_batch_size(device: torch.device) -> int:
    """The default patches per call of :func:`routed_forward` on ``device``: cache-sized on CPU, large elsewhere
    (a GPU idles on small calls)."""
    return CPU_ROUTE_BATCH if device.type == "cpu" else ACCELERATOR_ROUTE_BATCH


@torch.no_grad()
def routed_forward(
    lr: Tensor,
    networks: Sequence[Network],
    scale: int,
    policy: Callable[[Tensor], Tensor],
    patch_size: int = 32,
    overlap: int = 4,
    batch_size: int | None = None,
    count_macs: bool = False,
    blend: Literal["crop", "average"] = "average",
    deploy: bool = False,
) -> RoutedOutput:
    """Routes each LR tile to one of ``networks`` (chosen by ``policy``), batching tiles per network.

    ``policy`` maps (P, C, p, p) tiles to (P,) network indices; it and the networks see ``batch_size`` tiles per
    call (None: :func:`route_batch_size` of ``lr``'s device). With ``count_macs`` the MACs of everything
    that ran (policy and networks) are counted by :class:`effsr.cost.MacCounter`, not estimated.
    Patches are gathered in one indexing operation and (``blend="average"``) stitched with ``index_add_``
    per batch, so the only Python loops are over networks and batches, never over patches.
    ``deploy`` runs each network (an ``nn.Module``) in its deploy form, :func:`effsr.inference.deploy.deployed`
    (convolutions fused with their activations; same output to float rounding). It is off while counting MACs:
    the count is of the networks' own layers, which FlopCounterMode sees.
    """
    if lr.shape[0] != 1:
        raise ValueError("routed_forward takes one image at a time (batch size 1)")
    if batch_size is None:
        batch_size = route_batch_size(lr.device)
    if batch_size < 1:
        raise ValueError(f"routed_forward needs batch_size >= 1, got {batch_size}")
    from effsr.cost import MacCounter

    modules = [item for item in (policy, *networks) if isinstance(item, torch.nn.Module)]
    counter = MacCounter(*modules) if count_macs else None
    if deploy and not count_macs:
        networks = [deployed(item) if isinstance(item, torch.nn.Module) else item for item in networks]
    if counter is not None:
        counter.__enter__()
    try:
        # Routing policies (classifiers) need full-size patches: a smaller image is replicate-padded.
        padded, height, width = _pad_to_patch(lr, patch_size)
        stride = max(1, patch_size - overlap)
        row_starts = _axis_starts(padded.shape[-2], patch_size, stride)
        col_starts = _axis_starts(padded.shape[-1], patch_size, stride)
        corners = [(y, x) for y in row_starts for x in col_starts]
        patches = grid_patches(padded, row_starts, col_starts, patch_size)
        choices = torch.cat([
            policy(patches[start:start + batch_size]).reshape(-1).long()
            for start in range(0, len(corners), batch_size)
        ]).cpu()
        if choices.numel() != len(corners) or (choices < 0).any() or (choices >= len(networks)).any():
            raise ValueError(f"routing policy must return one index in [0, {len(networks)}) per patch")
        if blend == "average":
            stitcher = _AverageStitcher(padded, scale, patch_size, row_starts, col_starts)
        else:
            crop_stitcher = _Stitcher(padded, scale, patch_size, patch_size, overlap, blend)
        for network_index, network in enumerate(networks):
            selected = torch.nonzero(choices == network_index).flatten()
            for start in range(0, len(selected), batch_size):
                chunk = selected[start:start + batch_size]
                outputs = network(patches[chunk.to(patches.device)])
                if blend == "average":
                    stitcher.add(chunk.to(padded.device), outputs)
                    continue
                for index, output in zip(chunk.tolist(), outputs, strict=True):
                    crop_stitcher.add(*corners[index], output[None])
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    sr = stitcher.result() if blend == "average" else crop_stitcher.result()
    route_map = choices.reshape(len(row_starts), len(col_starts))
    return RoutedOutput(
        sr=sr[..., : height * scale, : width * scale],
        route_map=route_map,
        corners=corners,
        patches_per_network=torch.bincount(choices, minlength=len(networks)),
        macs=None if counter is None else int(counter.macs),
    )


ROUTE_COLOURS = np.array(
    [[46, 204, 113], [241, 196, 15], [231, 76, 60], [52, 152, 219], [155, 89, 182], [230, 126, 34]],
    dtype=np.float32,
)


def route_overlay(image: np.ndarray, route_map: Tensor, corners: Sequence[tuple[int, int]], patch_size: int,
                  image_scale: int = 1, alpha: float = 0.45) -> np.ndarray:
    """Tints each patch of an HxWx3 uint8 image by the network it was routed to (W&B routing maps).

    ``image_scale`` is the image's size relative to the LR grid (1 for the LR image, ``scale`` for SR).
    Where tiles overlap, the later tile's colour wins.
    """
    tinted = image.astype(np.float32).copy()
    colour_of = ROUTE_COLOURS[route_map.flatten().numpy() % len(ROUTE_COLOURS)]
    size = patch_size * image_scale
    for (y, x), colour in zip(corners, colour_of, strict=True):
        region = tinted[y * image_scale:y * image_scale + size, x * image_scale:x * image_scale + size]
        region[...] = (1 - alpha) * image[y * image_scale:y * image_scale + size,
                                          x * image_scale:x * image_scale + size] + alpha * colour
    return tinted.round().clip(0, 255).astype(np.uint8)
