"""SMSR sparse inference vs dense vs the official gather/unfold path on Set5 ×2 (CPU, fixed threads).

    python benchmarks/smsr_inference.py [--ckpt_path C] [--hr-dir DIR] [--threads N] [--repeats R] [--clock cpu]

``--ckpt_path`` takes an official SMSR state_dict (legacy format too, loaded with ``weights_only``) or an effsr
checkpoint; its scale sets the LR (Set5 ×S) and its own spatial masks are used. Without a checkpoint the network
has random weights with the released ×2 checkpoint's per-layer sparse channel counts and, per image, spatial
masks thresholded from an edge map to the released per-SMM densities.
``sparse`` is the library's path (per block: gathers, or dense convs above ``--dense-above``, default
``DENSE_ABOVE_DENSITY``), ``gathered`` the same with every block on gathers. Before the last line: each image's
sparse speedup over dense. Last line: ``speedup_vs_dense=X.XX macs_ratio=Y.YY`` (dense MACs / the sparse MACs
at the measured densities as the gathers execute them, the paper's count).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effsr.methods.smsr import DENSE_ABOVE_DENSITY, SMSR, load_smsr_weights

SPARSE_COUNTS = [[40, 55, 61, 64], [48, 60, 63, 64], [48, 57, 63, 64], [61, 64, 64, 64], [50, 59, 64, 64]]
DENSITIES = {
    "baby": [0.08, 0.19, 0.40, 0.06, 0.15],
    "bird": [0.40, 0.20, 0.46, 0.19, 0.38],
    "butterfly": [0.48, 0.58, 0.74, 0.68, 0.64],
    "head": [0.32, 0.33, 0.55, 0.18, 0.33],
    "woman": [0.20, 0.30, 0.54, 0.36, 0.40],
}


def load_lr(path: Path, scale: int) -> Tensor:
    """LR in [0, 255] made from the mod-cropped HR with the MATLAB-compatible bicubic (uint8, as a PNG)."""
    from PIL import Image

    from effsr.ops.imresize import bicubic_degrade

    _, lr = bicubic_degrade(np.asarray(Image.open(path).convert("RGB")), scale)
    return torch.from_numpy(lr).permute(2, 0, 1)[None].float()


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


def tile_coverage(masks: list[Tensor], tile: int) -> float:
    """Fraction of the image pixels inside tile×tile tiles that hold a masked pixel (what tile-sparse execution
    computes), pooled over the SMMs' masks; compare with the masks' own density."""
    covered = total = 0
    for mask in masks:
        height, width = mask.shape[-2:]
        tiles = F.max_pool2d(F.pad(mask, (0, -width % tile, 0, -height % tile)), tile)
        inside = tiles.repeat_interleave(tile, 2).repeat_interleave(tile, 3)[..., :height, :width]
        covered, total = covered + int(inside.sum()), total + mask.numel()
    return covered / total


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


def tile_body(block: torch.nn.Module, x: Tensor, spatial: Tensor, tile: int) -> Tensor:
    """Block/tile-level variant: sparse channels computed by conv2d on every tile×tile tile holding a masked
    pixel (with a 1-pixel halo), then re-masked per pixel (so it stays exact). Maps are zero-padded NHWC
    buffers with channels ordered [dense | sparse] per layer."""
    plan = block.plan()
    batch, channels, height, width = x.shape
    rows, cols = -(-height // tile), -(-width // tile)
    pad_h, pad_w = rows * tile + 2, cols * tile + 2
    mask = F.pad(spatial, (0, cols * tile - width, 0, rows * tile - height))
    tb, _, ty, tx = torch.nonzero(F.max_pool2d(mask, tile) > 0.5, as_tuple=True)
    n_tiles = tb.numel()
    span = torch.arange(tile + 2)
    origin = (tb * pad_h + ty * tile) * pad_w + tx * tile
    halo = (origin[:, None, None] + span[None, :, None] * pad_w + span[None, None, :]).reshape(-1)
    inner = (origin[:, None, None] + (span[None, 1:-1, None]) * pad_w + span[None, None, 1:-1]).reshape(-1)
    tile_mask = mask.reshape(batch, rows, tile, cols, tile)[tb, ty, :, tx, :].unsqueeze(1)
    buffer = x.new_zeros(batch, pad_h, pad_w, channels)
    buffer[:, 1 : height + 1, 1 : width + 1] = x.permute(0, 2, 3, 1)
    interiors: list[Tensor] = []
    order: list[Tensor] = []
    previous = torch.arange(channels)
    n_dense_prev = channels
    for index, conv in enumerate(block.body):
        layer = plan["layers"][index]
        dense_out, sparse_out = layer["dense_out"], layer["sparse_out"]
        n_dense, n_sparse = dense_out.numel(), sparse_out.numel()
        weight = conv.weight[:, previous]
        tile_weight = weight[sparse_out]
        if index:
            to_dense = weight[dense_out].clone()
            to_dense[:, :n_dense_prev] = 0
            tile_weight = torch.cat([tile_weight, to_dense])
        output = x.new_zeros(batch, pad_h, pad_w, channels)
        if n_dense and n_dense_prev:
            dense_in = buffer[..., :n_dense_prev].permute(0, 3, 1, 2)
            conv_out = F.conv2d(dense_in, weight[dense_out][:, :n_dense_prev])
            output[:, 1 : height + 1, 1 : width + 1, :n_dense] = conv_out[..., :height, :width].permute(0, 2, 3, 1)
        if n_tiles and tile_weight.shape[0]:
            tiles = buffer.view(-1, channels).index_select(0, halo).view(n_tiles, tile + 2, tile + 2, channels)
            result = (F.conv2d(tiles.permute(0, 3, 1, 2), tile_weight) * tile_mask).permute(0, 2, 3, 1)
            flat = output.view(-1, channels)
            if n_sparse:
                flat[:, n_dense:].index_copy_(0, inner, result[..., :n_sparse].reshape(-1, n_sparse))
            if index and n_dense:
                flat[:, :n_dense].index_add_(0, inner, result[..., n_sparse:].reshape(-1, n_dense))
        buffer = output.relu_()
        interiors.append(buffer[:, 1 : height + 1, 1 : width + 1])
        previous = torch.cat([dense_out, sparse_out])
        order.append(previous + index * channels)
        n_dense_prev = n_dense
    collect = block.collect.weight[:, torch.cat(order), 0, 0]
    stacked = torch.cat(interiors, 3).reshape(-1, collect.shape[1])
    out = torch.addmm(block.collect.bias, stacked, collect.t()).view(batch, height, width, channels)
    return out.permute(0, 3, 1, 2)


def forward_with_body(network: SMSR, x: Tensor, body) -> Tensor:
    """The SMSR skeleton with ``body(block, feature, spatial)`` as the SMB execution."""
    x = network.sub_mean(x)
    head = network.head(x)
    feature, outs = head, []
    for index, module in enumerate(network.body):
        spatial = (
            network.forced_spatial[index] if network.forced_spatial is not None else module.hard_spatial_mask(feature)
        )
        feature = module.ca(body(module.body, feature, spatial)) + feature
        outs.append(feature)
    feature = network.collect(torch.cat(outs, 1)) + head
    out = network.tail(feature) + F.interpolate(x, scale_factor=network.scale, mode="bicubic", align_corners=False)
    return network.add_mean(out)


def part_timers(network: SMSR, lr: Tensor, channels_last_dense: bool) -> tuple[dict[str, Callable[[], Tensor]],
                                                                             list[float]]:
    """Timers of the parts of one image's sparse and dense forwards, each on the inputs that part sees there
    (captured from one forward of each): ``head``/``ca``/``tail`` as ``(part, "sparse"|"dense")``, per SMM
    ``mask``, the library's block path ``block``, both exact paths ``gathered``/``fallback`` and the dense block
    ``plain``. Also the SMMs' spatial densities. ``ca`` includes the residual add, ``tail`` the final collect."""
    x = network.sub_mean(lr)
    inputs = {"sparse": x.contiguous(memory_format=torch.channels_last),
              "dense": x.contiguous(memory_format=torch.channels_last) if channels_last_dense else x}
    timers: dict[str, Callable[[], Tensor]] = {}
    densities = []
    for kind, start in inputs.items():
        timers[f"head {kind}"] = lambda start=start: network.head(start)
        feature = head = network.head(start)
        outputs = []
        for index, module in enumerate(network.body):
            block = module.body
            if kind == "sparse":
                spatial = module.hard_spatial_mask(feature)
                densities.append(float(spatial.mean()))
                timers[f"mask {index}"] = lambda module=module, feature=feature: module.hard_spatial_mask(feature)
                timers[f"block {index}"] = lambda b=block, f=feature, m=spatial: b.forward_sparse(f, m)
                timers[f"gathered {index}"] = lambda b=block, f=feature, m=spatial: b._forward_gathered(f, m)
                timers[f"fallback {index}"] = lambda b=block, f=feature, m=spatial: b.forward_dense_fallback(f, m)
                body = block.forward_sparse(feature, spatial)
            else:
                timers[f"plain {index}"] = lambda b=block, f=feature: b.forward_plain(f)
                body = block.forward_plain(feature)
            timers[f"ca{index} {kind}"] = lambda module=module, body=body, f=feature: module.ca(body) + f
            feature = module.ca(body) + feature
            outputs.append(feature)
        timers[f"tail {kind}"] = lambda o=outputs, f=feature, h=head, s=start: network.add_mean(
            network.tail(network.collect(torch.cat(o, 1)) + h)
            + F.interpolate(s, scale_factor=network.scale, mode="bicubic", align_corners=False))
    return timers, densities


def print_parts(network: SMSR, images: list, channels_last_dense: bool, repeats: int, clock: Callable[[], float],
                dense_above: float) -> None:
    """Per-part medians (interleaved rounds) of every image and their sums: where the sparse path's time goes."""
    timers, densities = {}, {}
    with torch.inference_mode():
        for stem, lr, masks, *_rest in images:
            network.forced_spatial = masks
            image_timers, densities[stem] = part_timers(network, lr, channels_last_dense)
            timers.update({(stem, name): timer for name, timer in image_timers.items()})
        for timer in timers.values():
            timer()
        times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
        keys = list(timers)
        for repeat in range(repeats):
            shift = (repeat * 7) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                start = clock()
                timers[key]()
                times[key].append((clock() - start) * 1000)
    sums: dict[str, float] = {}
    for stem in densities:
        def part(name: str, stem: str = stem) -> float:
            return float(np.median(times[(stem, name)]))
        n = len(densities[stem])
        row = {
            "head": (part("head sparse"), part("head dense")),
            "masks": (sum(part(f"mask {i}") for i in range(n)), 0.0),
            "blocks": (sum(part(f"block {i}") for i in range(n)), sum(part(f"plain {i}") for i in range(n))),
            "ca": (sum(part(f"ca{i} sparse") for i in range(n)), sum(part(f"ca{i} dense") for i in range(n))),
            "tail": (part("tail sparse"), part("tail dense")),
        }
        oracle = sum(min(part(f"gathered {i}"), part(f"fallback {i}")) for i in range(n))
        for name, (sparse, dense) in row.items():
            sums[f"{name} sparse"] = sums.get(f"{name} sparse", 0.0) + sparse
            sums[f"{name} dense"] = sums.get(f"{name} dense", 0.0) + dense
        sums["oracle"] = sums.get("oracle", 0.0) + oracle
        print(f"parts {stem} (sparse/dense ms): " + " ".join(f"{name} {a:.1f}/{b:.1f}" for name, (a, b) in row.items())
              + f" | blocks' oracle min(gathered, fallback) {oracle:.1f} | per SMM density gathered fallback plain: "
              + " | ".join(f"{densities[stem][i]:.2f} {part(f'gathered {i}'):.1f} {part(f'fallback {i}'):.1f} "
                           f"{part(f'plain {i}'):.1f}" for i in range(n)))
    names = ("head", "masks", "blocks", "ca", "tail")
    print("parts total (sparse/dense ms): " + " ".join(
        f"{name} {sums[f'{name} sparse']:.1f}/{sums[f'{name} dense']:.1f}" for name in names)
        + f" | blocks' oracle {sums['oracle']:.1f} (blocks on the rule, fallback above density {dense_above})")


def build_network(ckpt_path: str | None, pixel_range: float | None) -> SMSR:
    """The loaded checkpoint (official state_dict or effsr checkpoint), else the random released-sparsity stand-in."""
    if ckpt_path:
        return load_smsr_weights(ckpt_path, pixel_range)
    torch.manual_seed(0)
    network = SMSR(scale=2, pixel_range=255.0).eval()
    with torch.no_grad():
        for module, counts in zip(network.body, SPARSE_COUNTS, strict=True):
            logits = torch.zeros_like(module.body.ch_mask)
            for layer, n_sparse in enumerate(counts):
                logits[0, torch.randperm(64)[:n_sparse], layer, 1] = 1.0
            module.body.ch_mask.copy_(logits)
    return network


def main() -> None:
    default_dir = "/work/shared/data/benchmarks/Set5"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default=None,
                        help="official SMSR state_dict (.pt) or effsr checkpoint; its own masks are used")
    parser.add_argument("--pixel-range", type=float, default=None,
                        help="network pixel range (default: the checkpoint's, else 255 as in every SMSR config)")
    parser.add_argument("--hr-dir", default=default_dir if os.path.isdir(default_dir) else None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds over all variants and images")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: per-core CPU time with 1 thread (meaningful on a shared machine)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[8, 16], help="tile sizes of the tile variant")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dense_cl", "official"],
                        help="variants to leave out (shorter runs on a loaded machine)")
    parser.add_argument("--parts", action="store_true",
                        help="also time the parts of each forward (head, mask branches, each block on its path, "
                             "on gathers, on the fallback and dense, CA, tail) in --repeats interleaved rounds")
    parser.add_argument("--dense-above", dest="dense_above", type=float, default=DENSE_ABOVE_DENSITY,
                        help="spatial density above which a block runs dense convs (the library default)")
    args = parser.parse_args()
    if args.clock == "cpu":
        args.threads = 1
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from effsr.cost import count_macs

    network = build_network(args.ckpt_path, args.pixel_range)
    for module in network.body:
        module.body.dense_above = args.dense_above

    def gathered(t: Tensor) -> Tensor:
        for module in network.body:
            module.body.dense_above = 2.0
        try:
            return network.forward_sparse(t)
        finally:
            for module in network.body:
                module.body.dense_above = args.dense_above

    variants = {
        "sparse": network.forward_sparse,
        "gathered": gathered,
        **{
            f"tile{size}": (lambda t, size=size: forward_with_body(
                network, t, lambda block, f, m: tile_body(block, f, m, size)))
            for size in args.tiles
        },
        "dense": network.forward_dense,
        "dense_cl": lambda t: network.forward_dense(t.contiguous(memory_format=torch.channels_last)),
        "official": lambda t: forward_with_body(network, t, official_body),
    }
    for name in args.skip:
        variants.pop(name)
    names = list(variants)
    images = []
    for path in sorted(Path(args.hr_dir).glob("*.png")):
        lr = load_lr(path, network.scale) * (network.pixel_range / 255.0)
        masks = None if args.ckpt_path else edge_masks(lr, DENSITIES.get(path.stem, [0.35] * 5))
        network.forced_spatial = masks
        with torch.inference_mode():
            reference = network.forward_hard(lr)
            errors = {name: (variants[name](lr) - reference).abs().max().item() / network.pixel_range
                      for name in names if name.startswith(("sparse", "tile", "gathered"))}
            for function in variants.values():
                function(lr)
        macs = {name: count_macs(variants[name], lr) for name in names if name not in ("official", "sparse")}
        macs["sparse"] = macs["official"] = macs["gathered"]  # the sparse MAC count (paper's), as before
        macs["sparse_executed"] = count_macs(variants["sparse"], lr)
        paths = [module.body.last_path for module in network.body]
        with torch.inference_mode():
            network.forward_sparse(lr)
        coverage = [sum(float(m.mean()) for m in network.last_spatial) / len(network.last_spatial)] + [
            tile_coverage(network.last_spatial, tile) for tile in (4, 8, 16)]
        images.append((path.stem, lr, masks, macs, errors, paths, coverage))
    times = {name: np.zeros((args.repeats, len(images))) for name in names}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for index, (_, lr, masks, *_rest) in enumerate(images):
                network.forced_spatial = masks
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    start = clock()
                    variants[name](lr)
                    times[name][repeat, index] = (clock() - start) * 1000
    for index, (stem, lr, _, macs, errors, *_rest) in enumerate(images):
        cells = " | ".join(f"{name} {macs[name] / 1e9:.2f}G {np.median(times[name][:, index]):.1f}ms" for name in names)
        error_text = " ".join(f"{name}={value:.1e}" for name, value in errors.items())
        print(f"{stem:10s} lr={tuple(lr.shape[-2:])} {cells} | max|x-hard|: {error_text}")
    totals = {name: sum(image[3][name] for image in images) for name in names}
    medians = {name: float(np.median(times[name].sum(1))) for name in names}
    print("total      " + " | ".join(f"{name} {totals[name] / 1e9:.2f}G {medians[name]:.1f}ms" for name in names)
          + f" ({args.clock} clock, threads={args.threads}, medians of {args.repeats} interleaved rounds)")
    dense = "dense" if medians["dense"] <= medians.get("dense_cl", math.inf) else "dense_cl"
    per_round = {name: times[dense].sum(1) / times[name].sum(1) for name in names}
    for name in names:
        if name.startswith("tile") or name == "official":
            print(f"{name}_speedup_vs_dense={np.median(per_round[name]):.2f} "
                  f"macs_ratio={totals['dense'] / totals[name]:.2f}")
    print(f"gathered_speedup_vs_dense={np.median(per_round['gathered']):.2f} (every block on gathers)")
    print("sparse executed " + " ".join(f"{stem} {macs['sparse_executed'] / 1e9:.2f}G [{' '.join(paths)}]"
                                         for stem, _, _, macs, _, paths, _ in images)
          + f" (dense above density {args.dense_above})")
    print("mask density / tile coverage 4x4 8x8 16x16 (mean over SMMs): " + " ".join(
        f"{image[0]} " + "/".join(f"{value:.2f}" for value in image[6]) for image in images))
    if args.parts:
        print_parts(network, images, dense == "dense_cl", args.repeats, clock, args.dense_above)
    print("per-image sparse speedups vs dense: " + " ".join(
        f"{stem} {np.median(times[dense][:, index] / times['sparse'][:, index]):.2f}"
        for index, (stem, *_rest) in enumerate(images)))
    layouts = [name for name in ("dense", "dense_cl") if name in times]
    fastest_dense = np.minimum.reduce([times[name] for name in layouts])  # per round and image
    print("per-image sparse speedups vs the faster dense layout of each image and round: " + " ".join(
        f"{stem} {np.median(fastest_dense[:, index] / times['sparse'][:, index]):.2f}"
        for index, (stem, *_rest) in enumerate(images)))
    print(f"dense baseline = {dense}; per-round sparse speedups: "
          + " ".join(f"{value:.2f}" for value in per_round["sparse"]))
    print(f"speedup_vs_dense={np.median(per_round['sparse']):.2f} macs_ratio={totals['dense'] / totals['sparse']:.2f}")


if __name__ == "__main__":
    main()
