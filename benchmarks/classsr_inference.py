"""ClassSR routed inference on a 2K image vs the wide branch alone vs the official per-patch loop (CPU).

    python benchmarks/classsr_inference.py [--backbone msrresnet|fsrcnn|carnm] [--repeats R] [--photo NAME]
                                           [--threads T] [--clock cpu] [--plain-too] [--route-batch N]

The 2K image is a sample photograph (``effsr.data.sample``) upscaled with the MATLAB-compatible bicubic to
2040 px wide (DIV8K's Test2K size class); its LR input is the ×4 MATLAB-bicubic downscale. Weights are
random but fixed (seed 0); the classifier's last layer is then re-parameterised so that a third of the
patches go to each branch on this image (printed; trained ClassSR models route ~30-45 % to the narrow branch
on Test2K). Default backbone: MSRResNet 36/52/64 (16 blocks), whose time is dominated by 3×3 convolutions;
FSRCNN's time on CPU is dominated by its 9×9 transposed convolution, whose col2im cost hardly depends on d.

Variants, all on the same 32×32 LR patches with stride 28 (overlap averaging, whole image covered):
- ``routed``: effsr's routed tiling (one gather of all patches, classifier in batches, one batched call per
  branch, ``index_add_`` stitching), branches in their deploy form (``effsr.inference.deploy``: each conv fused
  with its ReLU/LeakyReLU);
- ``wide``: the same tiling and deploy form with every patch through the wide branch (the "-O" model; no
  classifier);
- with ``--plain-too`` also ``routed_plain`` / ``wide_plain``: the same without the deploy form (interleaved in
  the same repeats, so the deploy form's effect on each and on the ratio is measured in one run);
- ``per_patch``: the official test loop, each patch classified and super-resolved alone (batch 1).
All variants use the same weights (channels-last unless ``--no-channels-last``; it speeds every variant and
helps narrow convolutions most).
Repeats are interleaved (every repeat runs routed and wide back to back, alternating which goes first, then the
others) and medians reported, so
load from other processes affects all variants alike; speedup_vs_wide is the median over repeats of
wide/routed time within the same repeat (robust to load drifting between repeats); the slow per-patch loop
is timed in the first ``--per-patch-repeats`` repeats only. ``--whole-image`` also times the wide branch on the
whole LR image (no tiling, no overlap) for reference.
Last line: ``speedup_vs_wide=X.XX macs_ratio=Y.YY realised=R.RR speedup_vs_per_patch=Z.ZZ`` with
macs_ratio = MACs(wide tiled) / MACs(routed) and realised = speedup_vs_wide / macs_ratio (the goal: ≥ 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from effsr.cost import count_macs
from effsr.data.sample import sample_photograph
from effsr.inference.deploy import deployed
from effsr.inference.tiling import grid_patches, route_batch_size, routed_forward, tile_grid
from effsr.methods.classsr import ClassSRModule, ClassSRNet
from effsr.ops.imresize import bicubic_degrade, imresize_uint8

BACKBONES = {
    "fsrcnn": ("effsr.archs.FSRCNN", [16, 36, 56], {}),
    "carnm": ("effsr.archs.CARNM", [36, 52, 64], {}),
    "msrresnet": ("effsr.archs.MSRResNet", [36, 52, 64], {}),
}


def make_image(photo: str, width: int = 2040, height: int = 1080, scale: int = 4) -> tuple[Tensor, tuple[int, int]]:
    """LR tensor (1, 3, h, w) in [0, 1] of a sample photograph upscaled to ``width`` px (MATLAB bicubic) and
    centre-cropped to ``height`` rows (a 2K frame)."""
    image = sample_photograph(photo)
    hr = imresize_uint8(image, width / image.shape[1])
    top = max(0, (hr.shape[0] - height) // 2)
    hr, lr = bicubic_degrade(np.ascontiguousarray(hr[top:top + height]), scale)
    return torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255, hr.shape[:2]


def balance_classifier(module: ClassSRModule, lr: Tensor) -> Tensor:
    """Re-parameterises the (random) classifier's last layer so each branch gets 1/3 of the patches of ``lr``.

    z = u·(W f) with u the first principal direction of the random logits over this image's patches; logits
    become (q1 − z, 0, z − q2) with q1, q2 the 1/3 and 2/3 quantiles of z, so the routing stays a fixed
    function of the patch content (spatially coherent), with exactly balanced shares on this image.
    """
    if module.num_classes != 3:
        raise ValueError("balance_classifier expects three branches")
    patches = torch.cat([lr[..., y:y + 32, x:x + 32] for y in range(0, lr.shape[-2] - 31, 28)
                         for x in range(0, lr.shape[-1] - 31, 28)])
    linear = module.network.classifier.linear
    with torch.no_grad():
        logits = module.network.classifier(patches) - linear.bias
        direction = torch.linalg.svd(logits - logits.mean(0), full_matrices=False).Vh[0]
        projection = direction @ linear.weight
        z = logits @ direction
        low, high = torch.quantile(z, torch.tensor([1 / 3, 2 / 3]))
        linear.weight.copy_(torch.stack([-projection, torch.zeros_like(projection), projection]))
        linear.bias.copy_(torch.stack([low, torch.zeros(()), -high]))
        choices = module.network.classifier(patches).argmax(1)
    return torch.bincount(choices, minlength=3).float() / len(choices)


@torch.no_grad()
def per_branch_rates(module: ClassSRModule, lr: Tensor, batches: list[int], repeats: int,
                     clock: Callable[[], float]) -> None:
    """Prints each branch's MAC rate (deploy form) on the image's first 64 patches run in calls of each batch size,
    interleaved over ``repeats`` (medians): where the narrow branches lose throughput."""
    corners = tile_grid(lr.shape[-2], lr.shape[-1], module.patch_size, module.stride)
    rows, cols = sorted({y for y, _ in corners}), sorted({x for _, x in corners})
    patches = grid_patches(lr, rows, cols, module.patch_size)[:64]
    branches = [deployed(branch) for branch in module.network.branches]
    macs = module.patch_macs()[0]
    times: dict[tuple[int, int], list[float]] = {}
    for branch in branches:
        branch(patches[:2])
    for repeat in range(repeats):
        for batch in (batches if repeat % 2 == 0 else batches[::-1]):
            for index, branch in enumerate(branches):
                start = clock()
                for first in range(0, len(patches), batch):
                    branch(patches[first:first + batch])
                times.setdefault((index, batch), []).append(clock() - start)
    for batch in batches:
        rates = [len(patches) * macs[index] / statistics.median(times[(index, batch)]) / 1e9
                 for index in range(len(branches))]
        print(f"calls of {batch:>3} patches: GMAC/s per branch " + " / ".join(f"{rate:.1f}" for rate in rates)
              + "; rate vs the widest " + " / ".join(f"{rate / rates[-1]:.2f}" for rate in rates))


@torch.no_grad()
def per_patch_loop(module: ClassSRModule, lr: Tensor) -> Tensor:
    """The official code's test loop: every patch classified and super-resolved alone, then averaged."""
    size, stride, scale = module.patch_size, module.stride, module.scale
    height, width = lr.shape[-2:]
    rows = list(range(0, height - size + 1, stride))
    cols = list(range(0, width - size + 1, stride))
    rows += [height - size] if rows[-1] + size < height else []
    cols += [width - size] if cols[-1] + size < width else []
    output = lr.new_zeros(1, 3, height * scale, width * scale)
    weight = lr.new_zeros(1, 1, height * scale, width * scale)
    for y in rows:
        for x in cols:
            patch = lr[..., y:y + size, x:x + size]
            branch = module.network.branches[int(module.network.classifier(patch).argmax(1))]
            window = (..., slice(y * scale, (y + size) * scale), slice(x * scale, (x + size) * scale))
            output[window] += branch(patch)
            weight[window] += 1
    return output / weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="msrresnet")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photo", default="coffee")
    parser.add_argument("--blocks", type=int, default=16, help="MSRResNet residual blocks (paper: 16)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep NCHW weights (default: channels-last weights for every variant)")
    parser.add_argument("--per-patch-repeats", type=int, default=2,
                        help="repeats that also time the (slow) per-patch loop (the first ones)")
    parser.add_argument("--whole-image", action="store_true", help="also time the wide branch on the whole image")
    parser.add_argument("--plain-too", action="store_true",
                        help="also time routed and wide without the deploy form (routed_plain, wide_plain)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--route-batch", type=int, default=None,
                        help="patches per branch call in routed and wide (default: ClassSRModule's route_batch_size, "
                             "i.e. effsr.inference.tiling.route_batch_size of the device: 4 on CPU)")
    parser.add_argument("--batch-too", type=int, default=None, metavar="N",
                        help="also time routed and wide at N patches per call in the same repeats (routed_bN, "
                             "wide_bN), e.g. 64, the default before the cache-sized CPU batch")
    parser.add_argument("--per-branch", default=None, metavar="B1,B2,...",
                        help="only print each branch's MAC rate in calls of these batch sizes (e.g. 1,4,8,64) and exit")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (CPU seconds of this process, all "
                             "threads: less sensitive to other jobs on a shared machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone, widths, extra = BACKBONES[args.backbone]
    if args.backbone == "msrresnet":
        extra = {**extra, "num_blocks": args.blocks}
    network = ClassSRNet(backbone=backbone, widths=widths, scale=4, backbone_args=extra)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    module = ClassSRModule(network).eval()
    if args.route_batch is not None:
        module.route_batch_size = args.route_batch
    batch = module.route_batch_size or route_batch_size(torch.device("cpu"))
    wide_module = ClassSRModule(network, force_branch=network.num_classes - 1).eval()
    lr, hr_size = make_image(args.photo)
    shares = balance_classifier(module, lr)
    if args.per_branch is not None:
        print(f"backbone {args.backbone} {extra} widths {widths}, channels_last={args.channels_last}; threads "
              f"{torch.get_num_threads()}; {args.repeats} interleaved repeats, medians; {args.clock} clock")
        per_branch_rates(module, lr, [int(item) for item in args.per_branch.split(",")], args.repeats,
                         time.process_time if args.clock == "cpu" else time.perf_counter)
        return
    wide = network.branches[-1]

    def routed() -> Tensor:
        return module.route(lr).sr

    def tiled(networks: list[torch.nn.Module], policy: Callable[[Tensor], Tensor], deploy: bool,
              batch_size: int = batch) -> Tensor:
        return routed_forward(lr, networks, 4, policy, patch_size=module.patch_size,
                              overlap=module.patch_size - module.stride, batch_size=batch_size, deploy=deploy).sr

    def all_wide(patches: Tensor) -> Tensor:
        return torch.zeros(len(patches), dtype=torch.long)

    def wide_tiled() -> Tensor:
        return tiled([wide], all_wide, deploy=True)

    def per_patch() -> Tensor:
        return per_patch_loop(module, lr)

    def wide_whole() -> Tensor:
        return wide(lr)

    variants: dict[str, Callable[[], Tensor]] = {"routed": routed, "wide": wide_tiled, "per_patch": per_patch}
    if args.plain_too:
        variants["routed_plain"] = lambda: tiled(list(network.branches), module.policy, deploy=False)
        variants["wide_plain"] = lambda: tiled([wide], all_wide, deploy=False)
    other = f"_b{args.batch_too}" if args.batch_too is not None else None
    if other is not None:
        variants["routed" + other] = lambda: tiled(list(network.branches), module.policy, True, args.batch_too)
        variants["wide" + other] = lambda: tiled([wide], all_wide, True, args.batch_too)
    if args.whole_image:
        variants["wide_whole_image"] = wide_whole
    names = list(variants)
    crop = lr[..., :64, :64]
    with torch.no_grad():
        for function in (lambda: module.route(crop), lambda: wide(crop), lambda: per_patch_loop(module, crop)):
            function()
        corners = tile_grid(lr.shape[-2], lr.shape[-1], module.patch_size, module.stride)
        rows, cols = sorted({y for y, _ in corners}), sorted({x for _, x in corners})
        choices = module.policy(grid_patches(lr, rows, cols, module.patch_size))
        counts = torch.bincount(choices, minlength=network.num_classes).tolist()
        branch_macs, classifier_macs = module.patch_macs()
        routed_macs = sum(n * m for n, m in zip(counts, branch_macs, strict=True)) + len(choices) * classifier_macs
        macs = {"routed": routed_macs, "wide": len(choices) * branch_macs[-1], "per_patch": routed_macs,
                "routed_plain": routed_macs, "wide_plain": len(choices) * branch_macs[-1]}
        if other is not None:
            macs["routed" + other], macs["wide" + other] = macs["routed"], macs["wide"]
        if args.whole_image:
            macs["wide_whole_image"] = count_macs(copy.deepcopy(wide).to("meta"), lr.to("meta"))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, Tensor] = {}
    with torch.no_grad():
        for repeat in range(args.repeats):
            pair = ["routed", "wide"] if repeat % 2 == 0 else ["wide", "routed"]
            base = list(pair)
            if args.plain_too:
                pair += [name + "_plain" for name in base]
            if other is not None:
                pair += [name + other for name in base]
            order = pair + [name for name in names if name not in pair]
            for name in order:
                if name == "per_patch" and repeat >= args.per_patch_repeats:
                    continue
                start = clock()
                output = variants[name]()
                times[name].append(clock() - start)
                outputs.setdefault(name, output)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{name} {times[name][-1] * 1000:.0f} ms" for name in order if len(times[name]) == repeat + 1),
                flush=True)
        difference = float((outputs["routed"] - outputs["per_patch"]).abs().max())
        deploy_difference = (float((outputs["routed"] - outputs["routed_plain"]).abs().max())
                             if args.plain_too else None)
        forced = float((wide_module.route(lr[..., :96, :96]).sr - routed_forward(
            lr[..., :96, :96], [wide], 4, lambda p: torch.zeros(len(p), dtype=torch.long)).sr).abs().max())
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"image: skimage '{args.photo}' upscaled (MATLAB bicubic) to HR {hr_size[1]}x{hr_size[0]}, "
          f"LR {lr.shape[-1]}x{lr.shape[-2]} (x4); {len(choices)} LR patches 32x32, stride 28")
    print(f"backbone {args.backbone} {extra} widths {widths}, channels_last={args.channels_last}; random fixed "
          f"weights (seed 0), classifier last layer set for 1/3 per branch: proportions "
          f"{[round(float(s), 3) for s in shares]}; threads {torch.get_num_threads()}; "
          f"{args.repeats} interleaved repeats, medians; {args.clock} clock; route batch {batch}")
    print(f"routed == per-patch loop: max |diff| {difference:.2e}; force_branch=2 == wide tiled (96x96 crop): "
          f"{forced:.2e}; MACs per patch counted by FlopCounterMode; routed includes the classifier")
    if deploy_difference is not None:
        print(f"deploy form == plain branches (routed): max |diff| {deploy_difference:.2e}")
    for name in names:
        print(f"{name:<18}{median[name]:>10.1f} ms{macs[name] / 1e9:>10.2f} GMACs   runs "
              + " ".join(f"{value * 1000:.0f}" for value in times[name]))
    macs_ratio = macs["wide"] / macs["routed"]
    if args.plain_too:
        plain = statistics.median(w / r for w, r in zip(times["wide_plain"], times["routed_plain"], strict=True))
        gains = {name: statistics.median(p / d for p, d in zip(times[name + "_plain"], times[name], strict=True))
                 for name in ("routed", "wide")}
        print(f"plain branches (no deploy form): speedup_vs_wide={plain:.2f} realised={plain / macs_ratio:.2f}; "
              f"deploy form speeds routed x{gains['routed']:.2f}, wide x{gains['wide']:.2f} (medians of "
              f"per-repeat ratios)")
    if other is not None:
        at_other = statistics.median(w / r for w, r in zip(times["wide" + other], times["routed" + other],
                                                           strict=True))
        gains = {name: statistics.median(o / d for o, d in zip(times[name + other], times[name], strict=True))
                 for name in ("routed", "wide")}
        print(f"at {args.batch_too} patches per call: speedup_vs_wide={at_other:.2f} realised="
              f"{at_other / macs_ratio:.2f}; {batch} per call speeds routed x{gains['routed']:.2f}, wide "
              f"x{gains['wide']:.2f} (medians of per-repeat ratios)")
    per_repeat = [w / r for w, r in zip(times["wide"], times["routed"], strict=True)]
    paired = statistics.median(per_repeat)
    print(f"speedup vs wide: ratio of medians {median['wide'] / median['routed']:.2f}, median of per-repeat "
          f"ratios {paired:.2f} (routed and wide run in the same repeat; reported below); realised per repeat "
          + " ".join(f"{ratio / macs_ratio:.2f}" for ratio in per_repeat))
    print(f"speedup_vs_wide={paired:.2f} macs_ratio={macs_ratio:.2f} realised={paired / macs_ratio:.2f} "
          f"speedup_vs_per_patch={median['per_patch'] / median['routed']:.2f}")


if __name__ == "__main__":
    main()
