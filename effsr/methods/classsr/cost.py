"""ClassSR's cost: :func:`routed_costs` at class proportions, and the module's measured routing per image
and set (:class:`RoutedCostMixin`)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from effsr.cost import count_params, lr_size_for_720p, meta_macs, meta_macs_720p
from effsr.errors import ConfigError
from effsr.inference.tiling import RoutedOutput, route_overlay, tile_grid
from effsr.metrics import psnr as psnr_fn
from effsr.models.base import log_image
from effsr.models.evaluation import mean_values

if TYPE_CHECKING:
    from effsr.methods.classsr.network import ClassSRNet


CLASS_NAMES = ("simple", "medium", "hard")


class _ArchitectureMacs(NamedTuple):
    """The MAC counts :func:`routed_costs` combines; they follow from a network's architecture alone."""

    branch_720p: list[int]
    branch_32: list[int]
    classifier_32: int
    branch_tile: list[int]
    classifier_tile: int
    soft_mixture_720p: int


_COUNTED: weakref.WeakKeyDictionary[ClassSRNet, dict[int, _ArchitectureMacs]] = weakref.WeakKeyDictionary()


def _architecture_macs(network: ClassSRNet, patch_size: int) -> _ArchitectureMacs:
    """Each branch at 720p, per 32×32 and per ``patch_size``² LR patch, the classifier per patch and the soft
    mixture at 720p, counted on meta copies (:func:`effsr.cost.meta_macs`). A ClassSRNet keeps its branches and
    classifier (training changes weights, not shapes), so the counts are made once per network and tile size:
    every evaluation reports :func:`routed_costs` per set, which would otherwise count them again."""
    counted = _COUNTED.setdefault(network, {})
    if patch_size not in counted:
        scale = network.scale
        patch_32 = torch.zeros(1, 3, 32, 32)
        branch_32 = [meta_macs(branch, patch_32) for branch in network.branches]
        classifier_32 = meta_macs(network.classifier, patch_32)
        if patch_size == 32:
            branch_tile, classifier_tile = branch_32, classifier_32
        else:
            tile = torch.zeros(1, 3, patch_size, patch_size)
            branch_tile = [meta_macs(branch, tile) for branch in network.branches]
            classifier_tile = meta_macs(network.classifier, tile)
        counted[patch_size] = _ArchitectureMacs(
            branch_720p=[meta_macs_720p(branch, scale) for branch in network.branches], branch_32=branch_32,
            classifier_32=classifier_32, branch_tile=branch_tile, classifier_tile=classifier_tile,
            soft_mixture_720p=meta_macs_720p(network, scale))
    return counted[patch_size]


def routed_costs(network: ClassSRNet, proportions: Sequence[float], *, patch_size: int = 32, stride: int = 28,
                 classifier: bool = True) -> dict[str, Any]:
    """ClassSR's cost at class proportions ``p`` (share of patches per branch), every count from :mod:`effsr.cost`.

    - ``macs_720p`` (docs/protocol.md's unit, the ClassSR definition): Σ_k p_k·MACs_720p(branch k) + the
      classifier on each of the ``tile_patches_720p`` patches (``patch_size``, ``stride``) of the 720p LR frame.
    - ``macs_per_lr_patch_32``: Σ_k p_k·MACs(branch k, 32×32 LR patch) + the classifier's; ``flops_classsr`` =
      2 × that, the unit of the ClassSR tables.
    - ``*_wide``: the wide (last) branch alone on the same input; ``*_percent_of_wide``: the ratio in %.
    - ``macs_720p_tiled``: what routed tiling executes on a 720p frame (every tile, overlaps included, through
      its branch + the classifier); ``effsr test``'s ``macs`` counts the same way.
    - ``macs_720p_soft_mixture``: :meth:`ClassSRNet.forward` on the frame (all K branches + the classifier),
      the training-time mixture: not what inference runs.

    ``classifier=False`` (``force_branch``) leaves the classifier out.
    """
    shares = [float(value) for value in proportions]
    if len(shares) != network.num_classes or any(value < 0 for value in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ConfigError(f"class proportions must be {network.num_classes} non-negative shares summing to 1, "
                          f"got {shares}")
    tiles = len(tile_grid(*lr_size_for_720p(network.scale), patch_size, stride))
    counts = _architecture_macs(network, patch_size)
    branch_720p, branch_32, branch_tile = counts.branch_720p, counts.branch_32, counts.branch_tile
    classifier_32 = counts.classifier_32 if classifier else 0
    classifier_tile = counts.classifier_tile if classifier else 0

    def mix(values: list[int]) -> float:
        return float(sum(share * value for share, value in zip(shares, values, strict=True)))

    macs_720p = mix(branch_720p) + tiles * classifier_tile
    per_patch = mix(branch_32) + classifier_32
    return {
        "macs_720p": macs_720p,
        "macs_per_lr_patch_32": per_patch,
        "flops_classsr": 2 * per_patch,
        "class_proportions": shares,
        "macs_720p_wide": float(branch_720p[-1]),
        "macs_720p_percent_of_wide": 100.0 * macs_720p / branch_720p[-1],
        "flops_classsr_wide": 2.0 * branch_32[-1],
        "flops_classsr_percent_of_wide": 100.0 * per_patch / branch_32[-1],
        "macs_720p_per_branch": [float(value) for value in branch_720p],
        "macs_720p_classifier": float(tiles * classifier_tile),
        "macs_per_lr_patch_32_per_branch": [float(value) for value in branch_32],
        "macs_per_lr_patch_32_classifier": float(classifier_32),
        "tile_patches_720p": tiles,
        "macs_720p_tiled": tiles * (mix(branch_tile) + classifier_tile),
        "macs_720p_soft_mixture": float(counts.soft_mixture_720p),
    }


class RoutedCostMixin:
    """ClassSRModule's measured routing and cost: patches per branch per image and per set, executed MACs,
    ClassSR FLOPs, the routed cost report and routing maps (the SRModule evaluation hooks)."""

    def patch_macs(self) -> tuple[list[int], int]:
        """MACs of one ``patch_size``² LR patch through each branch, and through the classifier (0 when
        ``force_branch`` skips it)."""
        if self._patch_macs_cache is None:
            patch = torch.zeros(1, 3, self.patch_size, self.patch_size)
            branch_macs = [meta_macs(branch, patch) for branch in self.network.branches]
            self._patch_macs_cache = (branch_macs, meta_macs(self.network.classifier, patch))
        branch_macs, classifier_macs = self._patch_macs_cache
        return branch_macs, 0 if self.force_branch is not None else classifier_macs

    def _routed_macs(self, counts: Sequence[float]) -> dict[str, float]:
        """What routed tiling executed for ``counts`` patches per branch (``macs``), the wide branch on the
        same patches, and ClassSR's FLOPs per patch (2 × MACs, averaged over those patches)."""
        branch_macs, classifier_macs = self.patch_macs()
        patches = float(sum(counts))
        routed = float(sum(count * macs for count, macs in zip(counts, branch_macs, strict=True)))
        macs, macs_wide = routed + patches * classifier_macs, patches * branch_macs[-1]
        flops, flops_wide = 2 * (routed / patches + classifier_macs), 2.0 * branch_macs[-1]
        return {"macs": macs, "macs_wide": macs_wide, "flops_classsr": flops, "flops_classsr_wide": flops_wide,
                "flops_percent_of_wide": 100.0 * flops / flops_wide}

    def _image_record(self, route: RoutedOutput, sr: Tensor, hr: Tensor) -> dict[str, Any]:
        """Per-image values of one routed image (see :meth:`image_measurements`)."""
        return self._image_values(route.patches_per_network.tolist(), sr, hr)

    def _image_values(self, counts: Sequence[float], sr: Tensor, hr: Tensor) -> dict[str, Any]:
        patches = float(sum(counts))
        costs = self._routed_macs(counts)
        return {
            "psnr_rgb_crop4": float(psnr_fn(sr, hr, crop_border=4, y_channel=False)[0]),
            "patches": int(patches), "class_counts": [int(c) for c in counts],
            "class_proportions": [float(c) / patches for c in counts],
            **costs, "macs_percent_of_wide": 100.0 * costs["macs"] / costs["macs_wide"],
        }

    def image_measurements(self, measured: dict[str, float], sr: Tensor, hr: Tensor) -> dict[str, Any]:
        """Per image: RGB PSNR (4-px crop), patches per branch and their shares, executed MACs, FLOPs."""
        counts = [measured.get(f"class_count_{k}", 0.0) for k in range(self.num_classes)]
        return self._image_values(counts, sr, hr) if sum(counts) > 0 else {}

    def set_measurements(self, images: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A set's values from its own images: class shares = its patches per branch / its patches; the routed
        cost (:func:`routed_costs`) and FLOPs at those shares; mean RGB PSNR and executed MACs per image."""
        counts = [float(sum(column)) for column in zip(*(image["class_counts"] for image in images), strict=True)]
        patches = sum(counts)
        shares = [count / patches for count in counts]
        mean = mean_values([{key: image[key] for key in ("psnr_rgb_crop4", "macs", "macs_wide")} for image in images])
        routed = routed_costs(self.network, shares, patch_size=self.patch_size, stride=self.stride,
                              classifier=self.force_branch is None)
        pooled = self._routed_macs(counts)
        return {
            **mean, "macs_percent_of_wide": 100.0 * mean["macs"] / mean["macs_wide"],
            "patches": int(patches), "class_counts": [int(count) for count in counts], "class_proportions": shares,
            "flops_classsr": pooled["flops_classsr"], "flops_classsr_wide": pooled["flops_classsr_wide"],
            "flops_percent_of_wide": pooled["flops_percent_of_wide"],
            "flops_percent_of_wide_cost": pooled["flops_percent_of_wide"],
            "macs_720p": routed["macs_720p"], "macs_720p_wide": routed["macs_720p_wide"],
            "macs_720p_percent_of_wide": routed["macs_720p_percent_of_wide"],
            **{f"class_proportion_{k}": share for k, share in enumerate(shares)},
        }

    def on_eval_measured(self, stage: str, per_set: dict[str, dict[str, Any]], overall: dict[str, Any],
                         n_images: int) -> None:
        """The routed cost (:meth:`cost_report`, ``effsr profile``, the checkpoint) follows the class counts of
        all images of the last evaluation. One console line per evaluation gives each set's class shares (visible
        without a logger)."""
        if self.force_branch is not None or not overall.get("patches"):
            return
        shares = "; ".join(f"{name} " + "/".join(f"{100 * p:.0f}" for p in values.get("class_proportions", []))
                           for name, values in sorted(per_set.items()) if values.get("class_proportions"))
        rank_zero_info(f"[effsr] ClassSR routing ({stage} step {int(self.global_step)}), % of patches per branch "
                       f"narrow→wide: {shares}")
        self._measured_counts = torch.tensor(overall["class_counts"], dtype=torch.float64)
        self._measured_from = {"stage": stage, "sets": sorted(per_set), "images": n_images,
                               "patches": int(overall["patches"]),
                               "global_step": int(self.global_step)}

    def on_eval_image(self, stage: str, set_name: str, name: str, lr: Tensor, sr: Tensor, hr: Tensor) -> None:
        """Routing map of validation images (``route_maps_per_set`` per set and validation run)."""
        route, self._last_route = self._last_route, None
        key = (set_name, int(self.global_step))
        limit, logged = self.route_maps_per_set, self._route_maps_logged.get(key, 0)
        if (route is None or stage != "val" or self.logger is None or self.global_rank != 0
                or (limit is not None and logged >= limit)):
            return
        self._route_maps_logged = {done: count for done, count in self._route_maps_logged.items() if done[1] == key[1]}
        self._route_maps_logged[key] = logged + 1
        record = self._image_record(route, sr, hr)
        image = lr[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        tinted = route_overlay(image, route.route_map, route.corners, self.patch_size, image_scale=1)
        shares = ", ".join(f"{CLASS_NAMES[k] if self.num_classes == 3 else k}: {p:.0%}"
                           for k, p in enumerate(record["class_proportions"]))
        caption = (f"{name}: green/yellow/red = narrow/medium/wide ({shares}); "
                   f"FLOPs {record['flops_percent_of_wide']:.1f}% of wide")
        log_image(self.logger, f"val_routes/{set_name}/{name}", tinted, caption=caption, step=self.global_step)

    def cost_proportions_used(self) -> tuple[list[float], str]:
        """The class proportions the routed cost is reported at, and where they come from: ``force_branch``
        (one-hot), the ``cost_proportions`` option, the last evaluation's measured shares (kept in the
        checkpoint), else equal shares (an assumption, labelled so)."""
        num = self.num_classes
        if self.force_branch is not None:
            return [float(k == self.force_branch) for k in range(num)], f"force_branch={self.force_branch}"
        if self.cost_proportions is not None:
            return list(self.cost_proportions), "cost_proportions option"
        if self._measured_counts is not None:
            counts = self._measured_counts.double()
            origin = self._measured_from
            where = (f" ({origin.get('stage')} on {', '.join(origin.get('sets', []))}: {origin.get('images')} images, "
                     f"{origin.get('patches')} patches, step {origin.get('global_step')})" if origin else "")
            source = f"measured: share of patches per branch in the last evaluation{where}"
            return (counts / counts.sum()).tolist(), source
        return [1.0 / num] * num, (f"uniform 1/{num} (assumed, not measured: no evaluation recorded; "
                                   "set --model.init_args.cost_proportions or evaluate first)")

    def cost_report(self) -> dict[str, float]:
        """Params of all branches + classifier; the routed cost (:func:`routed_costs`) at
        :meth:`cost_proportions_used`: ``macs_720p`` = Σ_k p_k · MACs_720p(branch k) + the classifier on the
        720p patch grid, ``flops_classsr`` per 32×32 patch, both also for the wide branch alone."""
        proportions, _ = self.cost_proportions_used()
        costs = routed_costs(self.network, proportions, patch_size=self.patch_size, stride=self.stride,
                             classifier=self.force_branch is None)
        _, classifier_macs = self.patch_macs()
        counted = self.network if self.force_branch is None else self.network.branches[self.force_branch]
        report = {
            "params": float(count_params(counted)),
            "macs_720p": costs["macs_720p"],
            "macs_720p_wide": costs["macs_720p_wide"],
            "macs_720p_percent_of_wide": costs["macs_720p_percent_of_wide"],
            "flops_classsr": costs["flops_classsr"],
            "flops_classsr_wide": costs["flops_classsr_wide"],
            "flops_percent_of_wide_cost": costs["flops_classsr_percent_of_wide"],
            "classifier_macs_per_patch": float(classifier_macs),
        }
        report.update({f"class_proportion_{k}": float(p) for k, p in enumerate(proportions)})
        return report
