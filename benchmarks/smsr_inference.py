"""SMSR sparse inference vs dense vs the official gather/unfold path on Set5 ×2 (CPU, fixed threads).

    python benchmarks/smsr_inference.py [--ckpt_path C] [--hr-dir DIR] [--threads N] [--repeats R]

Without a checkpoint the network has random weights with the released ×2 checkpoint's per-layer sparse
channel counts and, per image, spatial masks thresholded from an edge map to the released per-SMM densities.
Last line: ``speedup_vs_dense=X.XX macs_ratio=Y.YY`` (dense MACs / sparse MACs).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effsr.methods.smsr import SMSR

SPARSE_COUNTS = [[40, 55, 61, 64], [48, 60, 63, 64], [48, 57, 63, 64], [61, 64, 64, 64], [50, 59, 64, 64]]
DENSITIES = {
    "baby": [0.08, 0.19, 0.40, 0.06, 0.15],
    "bird": [0.40, 0.20, 0.46, 0.19, 0.38],
    "butterfly": [0.48, 0.58, 0.74, 0.68, 0.64],
    "head": [0.32, 0.33, 0.55, 0.18, 0.33],
    "woman": [0.20, 0.30, 0.54, 0.36, 0.40],
}


def load_hr(path: Path, scale: int) -> Tensor:
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"))
    height, width = array.shape[0] - array.shape[0] % scale, array.shape[1] - array.shape[1] % scale
    return torch.from_numpy(array[:height, :width].copy()).permute(2, 0, 1)[None].float() / 255


def degrade(hr: Tensor, scale: int) -> Tensor:
    try:
        from effsr.ops.imresize import bicubic_degrade

        return bicubic_degrade(hr, scale)
    except ImportError:
        lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
        return lr.clamp(0, 1).mul(255).round().div(255)


def edge_masks(lr: Tensor, densities: list[float]) -> list[Tensor]:
    gray = lr.mean(1, keepdim=True)
    gradient = (gray[..., 1:, :-1] - gray[..., :-1, :-1]).abs() + (gray[..., :-1, 1:] - gray[..., :-1, :-1]).abs()
    gradient = F.pad(gradient, (0, 1, 0, 1), mode="replicate")
    gradient = F.avg_pool2d(gradient, 3, 1, 1) + 1e-6 * torch.rand_like(gradient)
    masks = []
    for density in densities:
        threshold = torch.quantile(gradient.flatten(), 1 - density)
        masks.append((gradient > threshold).float())
    return masks


def official_body(block: torch.nn.Module, x: Tensor, spatial: Tensor) -> Tensor:
    """Straightforward re-implementation of the official eval path: unfold + matmul, channel-major gathers."""
    batch, channels, height, width = x.shape
    sparse_mask = block.hard_channel_mask()
    positions = torch.nonzero(spatial.reshape(batch, -1)[0] > 0.5).squeeze(1)
    outputs: list[Tensor] = []
    for index, conv in enumerate(block.body):
        dense_out, sparse_out = (
            torch.nonzero(~sparse_mask[:, index]).squeeze(1),
            torch.nonzero(sparse_mask[:, index]).squeeze(1),
        )
        weight = conv.weight
        if index == 0:
            cols = F.unfold(x, 3, padding=1)
            full = weight.view(channels, -1) @ cols
            result = torch.zeros_like(full)
            result[:, dense_out] = full[:, dense_out]
            result[:, sparse_out] = full[:, sparse_out] * spatial.view(batch, 1, -1)
            feature = F.relu(result).view(batch, channels, height, width)
        else:
            previous = sparse_mask[:, index - 1]
            cols = F.unfold(feature, 3, padding=1).view(batch, channels, 9, -1)
            cols_d = cols[:, ~previous].reshape(batch, -1, height * width)
            w = weight.view(channels, channels, 9)
            n_prev_d, n_prev_s = 9 * int((~previous).sum()), 9 * int(previous.sum())
            dd = w[dense_out][:, ~previous].reshape(len(dense_out), n_prev_d) @ cols_d
            cols_s = cols[:, previous][..., positions].reshape(batch, n_prev_s, len(positions))
            cols_d_at = cols[:, ~previous][..., positions].reshape(batch, n_prev_d, len(positions))
            result = torch.zeros(batch, channels, height * width)
            result[:, dense_out] = dd
            result[:, dense_out.unsqueeze(1), positions.unsqueeze(0)] += (
                w[dense_out][:, previous].reshape(len(dense_out), n_prev_s) @ cols_s
            )
            result[:, sparse_out.unsqueeze(1), positions.unsqueeze(0)] = (
                w[sparse_out][:, ~previous].reshape(len(sparse_out), n_prev_d) @ cols_d_at
                + w[sparse_out][:, previous].reshape(len(sparse_out), n_prev_s) @ cols_s
            )
            feature = F.relu(result).view(batch, channels, height, width)
        outputs.append(feature)
    return block.collect(torch.cat(outputs, 1))


def official_forward(network: SMSR, x: Tensor) -> Tensor:
    x = network.sub_mean(x)
    head = network.head(x)
    feature, outs = head, []
    for index, module in enumerate(network.body):
        spatial = (
            network.forced_spatial[index] if network.forced_spatial is not None else module.hard_spatial_mask(feature)
        )
        feature = module.ca(official_body(module.body, feature, spatial)) + feature
        outs.append(feature)
    feature = network.collect(torch.cat(outs, 1)) + head
    out = network.tail(feature) + F.interpolate(x, scale_factor=network.scale, mode="bicubic", align_corners=False)
    return network.add_mean(out)


def timed(function, x: Tensor, repeats: int) -> float:
    with torch.no_grad():
        function(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            function(x)
            best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    default_dir = "/work/shared/data/benchmarks/Set5"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--hr-dir", default=default_dir if os.path.isdir(default_dir) else None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from effsr.cost import count_macs

    torch.manual_seed(0)
    network = SMSR(scale=2, pixel_range=255.0).eval()
    if args.ckpt_path:
        state = torch.load(args.ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
        network.load_state_dict({k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")})
    else:
        with torch.no_grad():
            for module, counts in zip(network.body, SPARSE_COUNTS, strict=True):
                logits = torch.zeros_like(module.body.ch_mask)
                for layer, n_sparse in enumerate(counts):
                    logits[0, torch.randperm(64)[:n_sparse], layer, 1] = 1.0
                module.body.ch_mask.copy_(logits)
    totals = np.zeros(6)
    for path in sorted(Path(args.hr_dir).glob("*.png")):
        lr = degrade(load_hr(path, 2), 2) * 255
        network.forced_spatial = None if args.ckpt_path else edge_masks(lr, DENSITIES.get(path.stem, [0.35] * 5))
        with torch.no_grad():
            error = (network.forward_sparse(lr) - network.forward_hard(lr)).abs().max().item() / 255
        macs = [count_macs(f, lr) for f in (network.forward_sparse, network.forward_dense)]
        macs.append(macs[0])
        times = [
            timed(f, lr, args.repeats)
            for f in (network.forward_sparse, network.forward_dense, lambda t: official_forward(network, t))
        ]
        totals += np.array(macs + times, dtype=float)
        print(
            f"{path.stem:10s} lr={tuple(lr.shape[-2:])} sparse {macs[0] / 1e9:.2f}G {times[0]:.1f}ms | "
            f"dense {macs[1] / 1e9:.2f}G {times[1]:.1f}ms | official-style {macs[2] / 1e9:.2f}G {times[2]:.1f}ms "
            f"| max|sparse-hard|={error:.1e}"
        )
    print(
        f"total      sparse {totals[0] / 1e9:.2f}G {totals[3]:.1f}ms | dense {totals[1] / 1e9:.2f}G {totals[4]:.1f}ms"
        f" | official-style {totals[2] / 1e9:.2f}G {totals[5]:.1f}ms (threads={args.threads}, best of {args.repeats})"
    )
    print(f"speedup_vs_dense={totals[4] / totals[3]:.2f} macs_ratio={totals[1] / totals[0]:.2f}")


if __name__ == "__main__":
    main()
