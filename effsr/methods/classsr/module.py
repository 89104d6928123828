"""ClassSR (Kong et al., CVPR 2021): a patch classifier routes LR sub-images to K branches of growing width.

Pieces: :class:`Classifier`, :class:`ClassSRNet` (branches + classifier, built from any effsr backbone and
a list of widths), the losses :func:`class_loss` (L_class) and :func:`average_loss` (L_avg), the PSNR split
(:func:`split_by_score`, cached on disk) and :class:`ClassSRModule`, which runs the pipeline
``reference -> split -> branches -> classifier -> joint`` as :class:`effsr.phases.PhaseSchedule` phases and
evaluates with routed tiled inference (one batch per branch, overlap averaging, whole image covered).

Phase kinds (a phase's ``name`` starts with its kind, or ``settings.kind`` names it; names stay unique):

- ``reference``: the wide branch (last) trained with L1 on every sub-image (the paper's "-O" model);
  ``until: reference_ready`` ends it after one step when ``reference_checkpoint`` was loaded.
- ``split`` (``steps: 0``): the wide branch scores every training sub-image by PSNR; sorted and cut into K
  equal classes (highest PSNR -> class 0 -> narrowest branch). Cached under ``split_cache_dir`` keyed by
  the data and the reference weights.
- ``branches``: branch k is trained on class k only (``settings.branch``: an index or a list; default all K
  at once, each sample going to its class's branch). The sampler draws from those classes only.
- ``classifier``: branches frozen, classifier trained with w1·L1 + w2·L_class + w3·L_avg on the soft mixture.
- ``joint``: everything trained with the same loss.

Cost (:func:`routed_costs`, counted by :mod:`effsr.cost`): ClassSR's definition, the classifier plus each branch
weighted by the share of patches routed to it. :meth:`ClassSRModule.deployed_network` is the routed model
(:class:`RoutedClassSR`), so ``effsr profile`` times routed inference and reports that cost as its headline, at
the class proportions of the last evaluation (saved in the checkpoint), the ``cost_proportions`` option, or,
labelled as such, equal shares.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from effsr.cost import count_macs, count_params, lr_size_for_720p, macs_at_720p
from effsr.errors import CheckpointError, ConfigError
from effsr.inference.tiling import RoutedOutput, route_overlay, routed_forward, tile_grid
from effsr.metrics import psnr as psnr_fn
from effsr.models.base import SRModule, log_image
from effsr.models.evaluation import mean_values
from effsr.weights import StateFilter, load_network_state, strip_prefix

PHASE_KINDS = ("reference", "split", "branches", "classifier", "joint")
SPLIT_VERSION = 1
CLASS_NAMES = ("simple", "medium", "hard")


class Classifier(nn.Module):
    """ClassSR patch classifier: conv4x4/s4 -> 3x conv1x1 -> conv1x1(32) -> global avg pool -> linear."""

    def __init__(self, num_classes: int = 3, width: int = 128, pixel_range: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=4), nn.LeakyReLU(0.1, inplace=True)]
        for _ in range(3):
            layers += [nn.Conv2d(width, width, 1), nn.LeakyReLU(0.1, inplace=True)]
        layers += [nn.Conv2d(width, 32, 1)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(32, num_classes)
        self.pixel_range = pixel_range
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: convs Kaiming-normal (fan-in) x 0.1 with zero bias, the linear layer
        PyTorch's default. The small start keeps the first class probabilities near uniform."""
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                module.weight.data.mul_(0.1)
                nn.init.zeros_(module.bias)

    def forward(self, lr: Tensor) -> Tensor:
        """Returns class logits (N, K) for LR patches in [0, pixel_range]."""
        features = self.features(lr / self.pixel_range).mean(dim=(2, 3))
        return self.linear(features)


def class_loss(probabilities: Tensor) -> Tensor:
    """L_class: negative summed pairwise |p_i - p_j| per sample (pushes probabilities to one-hot), batch mean."""
    differences = probabilities.unsqueeze(2) - probabilities.unsqueeze(1)
    return -differences.abs().sum(dim=(1, 2)).mean() / 2


def average_loss(probabilities: Tensor, normalized: bool = True) -> Tensor:
    """L_avg: sum over classes of |sum_batch p_i - B/K| (equal use of the classes over the batch).

    ``normalized`` divides by 4·B/K as the official code does; the paper weights (w3 = 3) refer to that form.
    """
    batch, num_classes = probabilities.shape
    target = batch / num_classes
    loss = (probabilities.sum(dim=0) - target).abs().sum()
    return loss / (4 * target) if normalized else loss


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` over all DDP ranks keeping gradients (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def _import_backbone(path: str) -> type[nn.Module]:
    """A backbone class from ``module.Class`` or a name exported by :mod:`effsr.archs`."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "effsr.archs")
        return getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"ClassSRNet backbone '{path}' not found (e.g. effsr.archs.FSRCNN)") from error


class ClassSRNet(nn.Module):
    """K branch networks (narrow first) and a classifier; soft mixture in training, argmax routing in inference.

    Either give ``branches`` (nn.Modules) or ``backbone`` (class path, e.g. ``effsr.archs.FSRCNN``) with one
    width per branch: branch k = ``backbone(scale=scale, **{width_arg: widths[k]}, **backbone_args)``.
    """

    def __init__(self, branches: list[nn.Module] | None = None, classifier: Classifier | None = None, *,
                 backbone: str | None = None, widths: list[int] | None = None, width_arg: str = "num_features",
                 backbone_args: dict[str, Any] | None = None, scale: int | None = None,
                 pixel_range: float | None = None) -> None:
        super().__init__()
        if branches is None:
            if backbone is None or not widths or scale is None:
                raise ConfigError("ClassSRNet needs `branches`, or `backbone`, `widths` and `scale`")
            extra = dict(backbone_args or {})
            if pixel_range is not None:
                extra["pixel_range"] = pixel_range
            backbone_class = _import_backbone(backbone)
            branches = [backbone_class(scale=scale, **{width_arg: width}, **extra) for width in widths]
            path = backbone if "." in backbone else f"effsr.archs.{backbone}"
            specs = [{"class_path": path, "init_args": {width_arg: int(width), **extra}} for width in widths]
        else:
            specs = []
        if len(branches) < 2:
            raise ConfigError("ClassSRNet needs at least two branches")
        #: per branch the backbone's ``class_path``/``init_args`` (empty when built from ``branches``): what
        #: :func:`export_backbone` writes as the config of a branch saved alone.
        self.branch_specs: list[dict[str, Any]] = specs
        self.branches = nn.ModuleList(branches)
        self.scale = int(branches[0].scale)
        if scale is not None and int(scale) != self.scale:
            raise ConfigError(f"ClassSRNet: scale={scale} but the branches upsample by x{self.scale}")
        self.pixel_range = float(getattr(branches[0], "pixel_range", 1.0))
        self.classifier = classifier or Classifier(len(branches), pixel_range=self.pixel_range)

    @property
    def num_classes(self) -> int:
        return len(self.branches)

    def forward(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (sum_k p_k * branch_k(lr), class probabilities)."""
        probabilities = F.softmax(self.classifier(lr), dim=1)
        outputs = torch.stack([branch(lr) for branch in self.branches], dim=1)
        return (outputs * probabilities[:, :, None, None, None]).sum(dim=1), probabilities


def routed_costs(network: ClassSRNet, proportions: Sequence[float], *, patch_size: int = 32, stride: int = 28,
                 classifier: bool = True) -> dict[str, Any]:
    """ClassSR's cost at class proportions ``p`` (share of patches per branch), every count from :mod:`effsr.cost`.

    - ``macs_720p`` (conventions.md's unit, the ClassSR definition): Σ_k p_k·MACs_720p(branch k) + the
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
    scale = network.scale
    tiles = len(tile_grid(*lr_size_for_720p(scale), patch_size, stride))
    patch_32 = torch.zeros(1, 3, 32, 32)
    branch_720p = [_meta_macs_720p(branch, scale) for branch in network.branches]
    branch_32 = [_meta_macs(branch, patch_32) for branch in network.branches]
    classifier_32 = _meta_macs(network.classifier, patch_32) if classifier else 0
    if patch_size == 32:
        branch_tile, classifier_tile = branch_32, classifier_32
    else:
        tile = torch.zeros(1, 3, patch_size, patch_size)
        branch_tile = [_meta_macs(branch, tile) for branch in network.branches]
        classifier_tile = _meta_macs(network.classifier, tile) if classifier else 0

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
        "macs_720p_soft_mixture": float(_meta_macs_720p(network, scale)),
    }


class RoutedClassSR(nn.Module):
    """ClassSR as deployed: per LR patch the classifier's argmax (or ``force_branch``) picks one branch; routed
    tiling (:func:`effsr.inference.tiling.routed_forward`) covers the whole image with overlap averaging.

    ``proportions`` (with ``proportions_source`` saying where they come from) are the class shares its cost is
    reported at: :meth:`profile_costs`, the hook :func:`effsr.profile.profile_network` uses instead of counting
    one forward (routing depends on the image, the cost is defined at the class proportions).
    """

    def __init__(self, network: ClassSRNet, patch_size: int = 32, stride: int = 28, batch_size: int = 64,
                 force_branch: int | None = None, proportions: Sequence[float] | None = None,
                 proportions_source: str = "") -> None:
        super().__init__()
        self.network = network
        self.scale = network.scale
        self.pixel_range = network.pixel_range
        self.patch_size = patch_size
        self.stride = stride
        self.batch_size = batch_size
        self.force_branch = force_branch
        uniform = [1.0 / network.num_classes] * network.num_classes
        self.proportions = [float(value) for value in (uniform if proportions is None else proportions)]
        self.proportions_source = proportions_source or "uniform (assumed)"

    def policy(self, patches: Tensor) -> Tensor:
        """Branch index per LR patch: classifier argmax or the forced branch."""
        if self.force_branch is not None:
            return torch.full((patches.shape[0],), self.force_branch, dtype=torch.long, device=patches.device)
        return self.network.classifier(patches).argmax(dim=1)

    def route(self, lr: Tensor, count_macs: bool = False) -> RoutedOutput:
        """Routed tiled inference of one (1, C, H, W) image in the network's pixel range."""
        return routed_forward(lr, list(self.network.branches), self.scale, self.policy,
                              patch_size=self.patch_size, overlap=self.patch_size - self.stride,
                              batch_size=self.batch_size, count_macs=count_macs)

    def forward(self, lr: Tensor) -> Tensor:
        return torch.cat([self.route(lr[index:index + 1]).sr for index in range(lr.shape[0])], dim=0)

    def profile_costs(self, scale: int) -> dict[str, Any]:
        """:func:`routed_costs` at :attr:`proportions`, with where they come from and the definition (the
        headline ``macs_720p`` and ``macs_per_lr_patch_32`` rounded to whole MACs)."""
        if int(scale) != self.scale:
            raise ConfigError(f"scale={scale} but ClassSR upsamples by x{self.scale}")
        costs = routed_costs(self.network, self.proportions, patch_size=self.patch_size, stride=self.stride,
                             classifier=self.force_branch is None)
        classifier = ("" if self.force_branch is not None else
                      f" + classifier on the {costs['tile_patches_720p']} patches of the 720p tiling "
                      f"(patch {self.patch_size}, stride {self.stride})")
        return {  # the headline counts as whole MACs, like every other network's
            "macs_720p": round(costs.pop("macs_720p")),
            "macs_per_lr_patch_32": round(costs.pop("macs_per_lr_patch_32")),
            "macs_720p_definition": f"ClassSR routed cost: sum_k p_k * MACs_720p(branch k){classifier}, "
                                    "p = class_proportions",
            "class_proportions": costs.pop("class_proportions"),
            "class_proportions_source": self.proportions_source,
            **costs,
        }


# ------------------------------------------------------------------------------------------------ split
def split_by_score(scores: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[float]]:
    """Equal-size classes by descending score (class 0 = highest PSNR = simplest) and the K-1 thresholds.

    Ties are broken by index, so class sizes differ by at most one; threshold k is the midpoint between the
    last score of class k and the first of class k + 1 (descending, e.g. ``[35.15, 27.17]`` for K = 3).
    """
    count = len(scores)
    if count < num_classes:
        raise ConfigError(f"the split needs at least {num_classes} training sub-images, got {count}")
    order = np.lexsort((np.arange(count), -np.asarray(scores, dtype=np.float64)))
    labels = np.empty(count, dtype=np.uint8)
    labels[order] = (np.arange(count) * num_classes // count).astype(np.uint8)
    thresholds = []
    for k in range(1, num_classes):
        boundary = -(-k * count // num_classes)
        low, high = float(scores[order[boundary]]), float(scores[order[boundary - 1]])
        thresholds.append((low + high) / 2 if math.isfinite(high) else low)
    return labels, thresholds


def split_by_thresholds(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Classes by fixed PSNR thresholds (the official ``divide_sub_images_train.py``): class k = number of
    thresholds above the score, so ``score >= t_0`` is class 0 (simplest) and ``score < t_last`` the hardest."""
    ordered = np.sort(np.asarray(thresholds, dtype=np.float64))[::-1]
    values = np.asarray(scores, dtype=np.float64)
    return (values[:, None] < ordered[None, :]).sum(axis=1).astype(np.uint8)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_object(value: Any) -> Any:
    if not _distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _all_gather_object(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _histogram_image(scores: np.ndarray, thresholds: list[float], title: str) -> np.ndarray:
    """HxWx3 uint8 rendering of the patch-PSNR histogram with the class thresholds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    finite = scores[np.isfinite(scores)]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.hist(finite, bins=min(100, max(10, len(finite) // 20)), color="#4a6fa5")
    for threshold in thresholds:
        axis.axvline(threshold, color="#c0392b", linestyle="--")
        axis.text(threshold, axis.get_ylim()[1] * 0.95, f" {threshold:.2f} dB", color="#c0392b",
                  rotation=90, va="top", ha="left", fontsize=8)
    axis.set_xlabel("reference PSNR of the sub-image (dB)")
    axis.set_ylabel("sub-images")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buffer).convert("RGB"))


# ------------------------------------------------------------------------------------------------ module
class ClassSRModule(SRModule):
    """ClassSR training phases and routed inference; ``network`` is a :class:`ClassSRNet`.

    Args:
        network: the branches and the classifier.
        loss_weights: (w1, w2, w3) of L1 (on [0, 1] whatever the pixel range), L_class and normalised L_avg.
        patch_size: LR patch side of routed inference (paper 32).
        stride: LR stride between patches (paper 28, i.e. overlap 4); the grid covers the whole image.
        route_batch_size: patches per branch call in routed inference.
        force_branch: route every patch through this branch (the "-O" baselines and ablations).
        reference_checkpoint: the "-O" model to start from instead of training it (a checkpoint of the backbone
            at the wide width, ``network.*`` keys, e.g. ``<run>/reference/reference.ckpt``, a ClassSR checkpoint,
            or a plain state dict); loaded when the pipeline starts (not in ``__init__``) and again right
            before the split is scored, so no training step touches it.
        wide_from_reference: the wide branch keeps the reference weights for ``branches`` (effsr's variant);
            False (official): it restarts from its initial weights after the split.
        split_model: score the split with this model instead of the reference (official: one MSRResNet for all
            backbones): an effsr SR checkpoint of the same scale (its run's ``config.yaml``) or
            ``CKPT@CONFIG.yaml``; a ClassSR checkpoint scores with its wide branch.
        split_thresholds: fixed PSNR thresholds (dB, K-1 of them, e.g. the official ``[35.15, 27.17]``)
            instead of K equal classes: class k = sub-images with k thresholds above their score.
        export_backbones: write the reference (when the split starts) and each branch after its class training
            (when ``classifier`` starts) as plain backbone checkpoints ``<default_root_dir>/<name>/<name>.ckpt``
            with a ``config.yaml`` beside it, for ``effsr test``/``effsr compare``.
        split_metric: ``rgb`` (official: RGB PSNR, border crop = scale) or ``y``.
        split_batch_size: sub-images per scoring batch.
        split_cache_dir: folder of cached splits (default ``<data.cache_dir>/classsr_splits``).
        route_maps_per_set: routing maps logged per validation set and validation run (None: every image).
        cost_proportions: class shares (one per branch, normalised) that :meth:`cost_report` and ``effsr profile``
            report the routed cost at, instead of those measured in the last evaluation.
        **kwargs: forwarded to :class:`SRModule` (``tile_above_pixels`` defaults to -1: routing tiles already).
    """

    def __init__(self, network: ClassSRNet, *args: Any, loss_weights: tuple[float, float, float] = (1000.0, 0.5, 3.0),
                 patch_size: int = 32, stride: int = 28, route_batch_size: int = 64, force_branch: int | None = None,
                 reference_checkpoint: str | None = None, wide_from_reference: bool = False,
                 split_model: str | None = None, split_thresholds: list[float] | None = None,
                 export_backbones: bool = True,
                 split_metric: Literal["rgb", "y"] = "rgb", split_batch_size: int = 64,
                 split_cache_dir: str | None = None, route_maps_per_set: int | None = None,
                 cost_proportions: list[float] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("tile_above_pixels", -1)
        super().__init__(network, *args, **kwargs)
        if not 0 < stride <= patch_size:
            raise ConfigError(f"ClassSR stride must be in 1..patch_size ({patch_size}), got {stride}")
        if force_branch is not None and not 0 <= force_branch < network.num_classes:
            raise ConfigError(f"force_branch must be in 0..{network.num_classes - 1}, got {force_branch}")
        if split_metric not in ("rgb", "y"):
            raise ConfigError(f"split_metric must be 'rgb' or 'y', got {split_metric!r}")
        if cost_proportions is not None:
            shares = [float(value) for value in cost_proportions]
            if len(shares) != network.num_classes or min(shares) < 0 or sum(shares) <= 0:
                raise ConfigError(f"cost_proportions needs {network.num_classes} non-negative shares, got {shares}")
            cost_proportions = [value / sum(shares) for value in shares]
        if split_thresholds is not None and len(split_thresholds) != network.num_classes - 1:
            raise ConfigError(f"split_thresholds needs {network.num_classes - 1} values (dB), got {split_thresholds}")
        self.cost_proportions = cost_proportions
        self.split_model = split_model
        self.fixed_thresholds = (None if split_thresholds is None
                                 else sorted((float(value) for value in split_thresholds), reverse=True))
        self.export_backbones = export_backbones
        self.loss_weights = tuple(float(weight) for weight in loss_weights)
        self.patch_size = patch_size
        self.stride = stride
        self.route_batch_size = route_batch_size
        self.force_branch = force_branch
        self.reference_checkpoint = reference_checkpoint
        self.wide_from_reference = wide_from_reference
        self.split_metric = split_metric
        self.split_batch_size = split_batch_size
        self.split_cache_dir = split_cache_dir
        self.route_maps_per_set = route_maps_per_set
        self.split_thresholds: list[float] = []
        self.split_labels: Tensor | None = None
        self.split_key: str | None = None
        self.split_info: dict[str, Any] = {}
        self._initial_wide = {key: value.detach().clone() for key, value in network.branches[-1].state_dict().items()}
        self._patch_macs_cache: tuple[list[int], int] | None = None
        self._last_route: RoutedOutput | None = None
        self._route_maps_logged: dict[tuple[str, int], int] = {}
        self._measured_counts: Tensor | None = None
        self._measured_from: dict[str, Any] = {}
        self._routing_counts: Tensor | None = None

    # ------------------------------------------------------------------ phases
    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    def phase_kind(self, name: str | None = None, settings: dict[str, Any] | None = None) -> str | None:
        """The kind (reference/split/branches/classifier/joint) of a phase, from ``settings.kind`` or its name."""
        name = self.phase_name if name is None else name
        settings = self.phase_settings if settings is None else settings
        if name is None:
            return None
        kind = settings.get("kind") or next((kind for kind in PHASE_KINDS if name.startswith(kind)), None)
        if kind not in PHASE_KINDS:
            raise ConfigError(
                f"ClassSR phase '{name}': the name must start with one of {PHASE_KINDS} (or set settings.kind)"
            )
        return kind

    def trained_branches(self, name: str | None = None, settings: dict[str, Any] | None = None) -> list[int]:
        """Branches trained in a phase (default: the current one)."""
        name = self.phase_name if name is None else name
        settings = self.phase_settings if settings is None else settings
        kind = self.phase_kind(name, settings)
        if kind in ("reference", "split", None):
            return [self.num_classes - 1]
        if kind == "classifier":
            return []
        selected = settings.get("branch") if kind == "branches" else None
        if selected is None:
            return list(range(self.num_classes))
        selected = [selected] if isinstance(selected, int) else list(selected)
        if any(not 0 <= int(k) < self.num_classes for k in selected):
            raise ConfigError(f"phase '{name}': branch must be in 0..{self.num_classes - 1}, got {selected}")
        return sorted(int(k) for k in selected)

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        """Sets the trainable set, computes the split (``split``) and restricts the data (``branches``)."""
        kind = self.phase_kind(name, settings)
        if kind == "reference" and self.split_model and not Path(self.split_model.partition("@")[0]).is_file():
            raise ConfigError(f"model.init_args.split_model '{self.split_model}' does not exist; train that model "
                              "first (e.g. `effsr fit --config experiments/classsr_msrresnet_x4.yaml` writes "
                              "runs/classsr_msrresnet_x4/reference/reference.ckpt) or set split_model: null")
        if kind == "reference" and self.reference_checkpoint:
            load_reference_weights(self.network, self.reference_checkpoint)
        if kind == "split":
            if self.reference_checkpoint:  # the loaded -O model itself, whatever the reference phase did
                load_reference_weights(self.network, self.reference_checkpoint)
            self._export("reference", self.num_classes - 1)
            self.compute_split(self._datamodule())
            if not self.wide_from_reference:
                self.network.branches[-1].load_state_dict(self._initial_wide)
            return False
        if kind == "classifier":
            for index in range(self.num_classes):
                self._export(f"branch_{index}", index)
        if kind == "joint":
            self._save_before_joint()
        if kind == "branches" and self.split_labels is None:
            raise ConfigError(f"phase '{name}' trains branches on their classes: put a `split` phase before it")
        self._set_trainable(name, settings)
        self._apply_data_subset()
        return True

    def _set_trainable(self, name: str | None = None, settings: dict[str, Any] | None = None) -> None:
        """requires_grad of a phase: the trained branches, the classifier in classifier/joint."""
        kind = self.phase_kind(name, settings)
        trained = set(self.trained_branches(name, settings))
        for parameter in self.network.classifier.parameters():
            parameter.requires_grad_(kind in ("classifier", "joint"))
        for index, branch in enumerate(self.network.branches):
            for parameter in branch.parameters():
                parameter.requires_grad_(index in trained)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the split and the phase's trainable set (the optimizer is rebuilt on it when resuming)."""
        super().on_load_checkpoint(checkpoint)
        if self.phase_kind() not in (None, "split"):
            self._set_trainable()

    def _run_config_path(self) -> Path | None:
        """The ``config.yaml`` that ``effsr fit`` wrote for this run, if any."""
        for folder in (self.trainer.log_dir or "", self.trainer.default_root_dir):
            if folder and (Path(folder) / "config.yaml").is_file():
                return Path(folder) / "config.yaml"
        return None

    def _save_before_joint(self) -> None:
        """The whole ClassSR model before ``joint`` (``export_backbones``): ``<default_root_dir>/before_joint/``
        ``before_joint.ckpt`` with the run's ``config.yaml``, so joint's effect is measurable in one run."""
        if not self.export_backbones or self._trainer is None:
            return
        folder = Path(self.trainer.default_root_dir) / "before_joint"
        self.trainer.save_checkpoint(folder / "before_joint.ckpt")  # every rank calls it; rank 0 writes
        source = self._run_config_path()
        if source is not None and _rank() == 0:
            handle, temporary = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=folder)
            with os.fdopen(handle, "w") as stream:
                stream.write(source.read_text())
            os.replace(temporary, folder / "config.yaml")
        rank_zero_info(f"[effsr] ClassSR: the model before joint saved as {folder / 'before_joint.ckpt'}")

    def _export(self, name: str, index: int) -> None:
        """Branch ``index`` as a plain backbone checkpoint (``export_backbones``; rank 0 only)."""
        if not self.export_backbones or self._trainer is None or _rank() != 0:
            return
        import yaml

        source = self._run_config_path()
        run_config = yaml.safe_load(source.read_text()) if source is not None else None
        specs = self.network.branch_specs
        info = {"name": name, "branch": index, "phase": self.phase_name, "global_step": int(self.global_step),
                "reference_checkpoint": self.reference_checkpoint}
        path = export_backbone(self.network.branches[index], Path(self.trainer.default_root_dir) / name, name,
                               specs[index] if specs else None, run_config, self.scale, info)
        rank_zero_info(f"[effsr] ClassSR: {name} (branch {index}) saved as {path}"
                       + ("" if specs else " (no config.yaml: the network was given as `branches`)"))

    def phase_condition(self, name: str) -> bool:
        """``reference_ready``: a reference checkpoint was loaded."""
        if name == "reference_ready":
            return self.reference_checkpoint is not None
        return super().phase_condition(name)

    def on_train_start(self) -> None:
        """Re-applies the per-class data subset after a resume."""
        self._apply_data_subset()

    def _datamodule(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "set_train_subset"):
            raise ConfigError("ClassSR's split and branch phases need effsr's SRDataModule (data: ...)")
        return datamodule

    def _apply_data_subset(self) -> None:
        if self._trainer is None or self.phase_kind() is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "set_train_subset"):
            return
        if self.phase_kind() != "branches" or self.split_labels is None:
            datamodule.set_train_subset(None)
            return
        trained = self.trained_branches()
        if len(trained) == self.num_classes:
            datamodule.set_train_subset(None)
            return
        indices = np.nonzero(np.isin(self.split_labels.numpy(), trained))[0]
        datamodule.set_train_subset(indices)

    def configure_optimizers(self) -> Any:
        """SRModule's optimizer; a phase with ``cosine_steps`` (and ``eta_min``) gets its own cosine schedule."""
        configured = super().configure_optimizers()
        steps = self.phase_settings.get("cosine_steps")
        if steps is None or isinstance(configured, dict):
            return configured
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            configured, T_max=int(steps), eta_min=float(self.phase_settings.get("eta_min", 1e-7)))
        return {"optimizer": configured, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def labels_for(self, indices: Tensor) -> Tensor:
        """Class of each training sub-image index (on the indices' device)."""
        if self.split_labels is None:
            raise ConfigError("no ClassSR split yet: put a `split` phase before the `branches` phases")
        return self.split_labels[indices.cpu()].to(indices.device).long()

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """reference: L1 of the wide branch; branches: L1 of each sample's class branch; classifier/joint:
        w1*L1 + w2*L_class + w3*L_avg (L_avg over the global batch under DDP)."""
        kind = self.phase_kind() or "reference"
        if kind in ("classifier", "joint"):
            sr, probabilities = self.network(lr)
            l1 = F.l1_loss(sr, hr) / self.network.pixel_range
            l_class = class_loss(probabilities)
            l_avg = average_loss(gather_with_grad(probabilities))
            w1, w2, w3 = self.loss_weights
            loss = w1 * l1 + w2 * l_class + w3 * l_avg
            logs = {"l1": l1.detach(), "l_class": l_class.detach(), "l_avg": l_avg.detach(),
                    f"{kind}/loss": loss.detach()}
            choices = probabilities.detach().argmax(dim=1)
            for k in range(self.num_classes):
                logs[f"class_prob/{k}"] = probabilities[:, k].detach().mean()
                logs[f"class_frac/{k}"] = (choices == k).float().mean()
            self._print_training_routing(choices, kind)
            return loss, logs
        if kind == "branches":
            return self._branches_loss(lr, hr, batch)
        sr = self.network.branches[-1](lr)
        loss = F.l1_loss(sr, hr)
        return loss, {"l1": loss.detach(), f"{kind}/loss": loss.detach()}

    def _print_training_routing(self, choices: Tensor, kind: str) -> None:
        """Without a logger, the argmax shares over training are printed every ``log_every_n_steps`` steps."""
        if self._trainer is None or self.loggers:
            return
        counts = torch.bincount(choices.cpu(), minlength=self.num_classes).double()
        self._routing_counts = counts if self._routing_counts is None else self._routing_counts + counts
        every = max(int(getattr(self.trainer, "log_every_n_steps", 50) or 50), 1)
        if (self.global_step + 1) % every == 0:
            total = self._routing_counts / self._routing_counts.sum()
            rank_zero_info(f"[effsr] ClassSR {kind} step {int(self.global_step) + 1}: argmax shares over the last "
                           f"{every} steps narrow→wide " + "/".join(f"{100 * p:.0f}%" for p in total.tolist()))
            self._routing_counts = None

    def _branches_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        labels = self.labels_for(batch["index"])
        total = lr.new_zeros(())
        used = 0
        logs: dict[str, Tensor] = {}
        for k in self.trained_branches():
            branch = self.network.branches[k]
            mask = labels == k
            count = int(mask.sum())
            logs[f"class_frac/{k}"] = mask.float().mean()
            if count == 0:
                # Keeps every trained parameter in the graph (DDP expects gradients for all of them).
                total = total + sum(parameter.sum() for parameter in branch.parameters()) * 0.0
                continue
            l1 = F.l1_loss(branch(lr[mask]), hr[mask])
            logs[f"l1_branch{k}"] = l1.detach()
            total = total + l1 * count
            used += count
        loss = total / max(used, 1)
        logs["l1"] = loss.detach()
        logs["branches/loss"] = loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ split
    def _split_folder(self, datamodule: Any) -> Path:
        if self.split_cache_dir:
            return Path(self.split_cache_dir).expanduser()
        return Path(getattr(datamodule, "cache_dir", None) or tempfile.gettempdir()) / "classsr_splits"

    def split_cache_key(self, datamodule: Any, scorer: nn.Module | None = None) -> str:
        """Hash of the sub-image table, the cached arrays it reads, the scoring weights and the protocol."""
        dataset = datamodule.train_dataset
        digest = hashlib.sha256()
        pairs = dataset.store.pairs
        header = [SPLIT_VERSION, self.num_classes, self.split_metric, int(datamodule.scale), int(dataset.lr_size),
                  [pair.hr_file.name for pair in pairs], [pair.lr_file.name for pair in pairs]]
        digest.update(json.dumps(header).encode())
        digest.update(np.ascontiguousarray(dataset.table).tobytes())
        scorer = self.network.branches[-1] if scorer is None else scorer
        for key, value in sorted(scorer.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def score_subimages(self, datamodule: Any, scorer: nn.Module | None = None) -> np.ndarray:
        """PSNR of every training sub-image through ``scorer`` (default the reference, i.e. the wide branch);
        each DDP rank scores a shard, then all gather."""
        reference = self.network.branches[-1] if scorer is None else scorer
        was_training = reference.training
        reference.eval()
        crop = self.scale
        indices: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        loader = datamodule.subimage_dataloader(batch_size=self.split_batch_size, split_across_ranks=True)
        device = next(self.network.parameters()).device
        reference.to(device)
        if _rank() == 0:
            rank_zero_info(f"[effsr] ClassSR split: scoring {datamodule.num_subimages} sub-images "
                           f"({len(loader)} batches of {self.split_batch_size} per rank)")
        try:
            for batch_index, batch in enumerate(loader):
                lr = batch["lr"].to(device).float().div_(255.0)
                hr = batch["hr"].to(device).float().div_(255.0)
                sr = reference(lr * self.pixel_range) / self.pixel_range
                values = psnr_fn(sr, hr, crop_border=crop, y_channel=self.split_metric == "y")
                indices.append(batch["index"].numpy())
                scores.append(values.cpu().numpy())
                if (batch_index + 1) % 200 == 0 and _rank() == 0:
                    rank_zero_info(f"[effsr] ClassSR split: {batch_index + 1}/{len(loader)} batches scored on rank 0")
        finally:
            reference.train(was_training)
        local = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
                 np.concatenate(scores) if scores else np.zeros(0, np.float64))
        total = datamodule.num_subimages
        full = np.full(total, np.nan, dtype=np.float64)
        for part_indices, part_scores in _all_gather_object(local):
            full[part_indices] = part_scores
        if np.isnan(full).any():
            raise ConfigError("ClassSR split: some sub-images were not scored (sampler/rank mismatch)")
        return full

    def compute_split(self, datamodule: Any) -> dict[str, Any]:
        """Scores (or loads the cached scores of) every training sub-image, splits them into K classes, logs.

        Returns the split summary (thresholds, class sizes, whether the cache was used, cache path).
        """
        from effsr.data.datasets import SubImageDataset

        if getattr(datamodule, "train_dataset", None) is None:
            datamodule.setup("fit")
        if not isinstance(datamodule.train_dataset, SubImageDataset):
            raise ConfigError("ClassSR's split scores fixed sub-images: set data.train_crop: grid")
        scorer = load_split_model(self.split_model, self.scale) if self.split_model else None
        key = self.split_cache_key(datamodule, scorer)
        path = self._split_folder(datamodule) / f"split-{key}.npz"
        scores = None
        if _rank() == 0 and path.is_file():
            with np.load(path) as stored:
                if len(stored["scores"]) == datamodule.num_subimages:
                    scores = stored["scores"]
        scores = _broadcast_object(scores)
        cached = scores is not None
        if scores is None:
            scores = self.score_subimages(datamodule, scorer)
            if _rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(prefix=".split-", suffix=".npz", dir=path.parent)
                with os.fdopen(handle, "wb") as stream:
                    np.savez(stream, scores=scores)
                os.replace(temporary, path)
        if self.fixed_thresholds is None:
            labels, thresholds = split_by_score(scores, self.num_classes)
        else:
            labels, thresholds = split_by_thresholds(scores, self.fixed_thresholds), list(self.fixed_thresholds)
        self.split_labels = torch.from_numpy(labels)
        self.split_thresholds = thresholds
        self.split_key = key
        finite = scores[np.isfinite(scores)]
        self.split_info = {
            "thresholds": thresholds, "class_sizes": np.bincount(labels, minlength=self.num_classes).tolist(),
            "cached": cached, "path": str(path), "num_subimages": int(len(scores)),
            "psnr_mean": float(finite.mean()) if len(finite) else math.nan,
            "scored_by": self.split_model or "reference (wide branch)",
            "thresholds_from": "split_thresholds option" if self.fixed_thresholds else "equal classes",
        }
        rank_zero_info(f"[effsr] ClassSR split ({'cached' if cached else 'computed'}, {path}): "
                       f"{len(scores)} sub-images, thresholds {', '.join(f'{t:.3f}' for t in thresholds)} dB, "
                       f"class sizes {self.split_info['class_sizes']}")
        self._log_split(scores, thresholds)
        return self.split_info

    def _log_split(self, scores: np.ndarray, thresholds: list[float]) -> None:
        if self._trainer is None or _rank() != 0:
            return
        metrics = {f"split/threshold_{k}": value for k, value in enumerate(thresholds)}
        metrics.update({"split/cached": float(self.split_info["cached"]), "split/num_subimages": float(len(scores)),
                        "split/psnr_mean": self.split_info["psnr_mean"]})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        title = (f"reference PSNR of {len(scores)} sub-images; thresholds "
                 + ", ".join(f"{t:.2f}" for t in thresholds) + " dB")
        image = _histogram_image(scores, thresholds, title)
        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(image).save(root / "classsr_split_histogram.png")
        for logger in self.loggers:
            log_image(logger, "classsr/split_psnr_histogram", image, caption=title, step=self.global_step)

    # ------------------------------------------------------------------ inference
    def _router(self, proportions: Sequence[float] | None = None, source: str = "") -> RoutedClassSR:
        return RoutedClassSR(self.network, self.patch_size, self.stride, self.route_batch_size, self.force_branch,
                             proportions, source)

    def deployed_network(self) -> RoutedClassSR:
        """The routed model (what inference runs), carrying the class proportions its cost is reported at."""
        return self._router(*self.cost_proportions_used())

    def policy(self, patches: Tensor) -> Tensor:
        """Branch index per LR patch: classifier argmax or the forced branch."""
        return self._router().policy(patches)

    def route(self, lr: Tensor, count_macs: bool = False) -> RoutedOutput:
        """Routed tiled inference of one (1, C, H, W) image in the network's pixel range."""
        return self._router().route(lr, count_macs=count_macs)

    def infer(self, lr: Tensor) -> Tensor:
        """Routed tiled inference over the whole image; in evaluation the patches per branch are measured
        (the last image's routing is kept for logging)."""
        outputs = []
        for index in range(lr.shape[0]):
            self._last_route = self.route(lr[index:index + 1])
            counts = self._last_route.patches_per_network.tolist()
            self.add_measurement(**{f"class_count_{k}": count for k, count in enumerate(counts)})
            outputs.append(self._last_route.sr)
        return torch.cat(outputs, dim=0)

    def patch_macs(self) -> tuple[list[int], int]:
        """MACs of one ``patch_size``² LR patch through each branch, and through the classifier (0 when
        ``force_branch`` skips it)."""
        if self._patch_macs_cache is None:
            patch = torch.zeros(1, 3, self.patch_size, self.patch_size)
            branch_macs = [_meta_macs(branch, patch) for branch in self.network.branches]
            self._patch_macs_cache = (branch_macs, _meta_macs(self.network.classifier, patch))
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

    # ------------------------------------------------------------------ checkpoints
    def structure_state(self) -> dict[str, Any]:
        """The split (labels per sub-image, thresholds, cache key) and the last evaluation's class counts."""
        counts = None if self._measured_counts is None else self._measured_counts.tolist()
        return {"split_thresholds": list(self.split_thresholds), "split_key": self.split_key,
                "split_labels": self.split_labels, "split_info": dict(self.split_info),
                "measured_class_counts": counts, "measured_from": dict(self._measured_from)}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        """Restores the split and the measured class counts (older checkpoints have none)."""
        self.split_thresholds = list(state.get("split_thresholds", []))
        self.split_key = state.get("split_key")
        self.split_labels = state.get("split_labels")
        self.split_info = dict(state.get("split_info") or {})
        counts = state.get("measured_class_counts")
        self._measured_counts = None if counts is None else torch.tensor(counts, dtype=torch.float64)
        self._measured_from = dict(state.get("measured_from") or {})


def _meta_macs(module: nn.Module, example: Tensor) -> int:
    """MACs of ``module(example)`` counted on a meta-device copy (shapes only), else on the module's device."""
    try:
        return count_macs(copy.deepcopy(module).to("meta"), example.to("meta"))
    except (NotImplementedError, RuntimeError):
        device = next(module.parameters()).device
        return count_macs(module, example.to(device))


def _meta_macs_720p(module: nn.Module, scale: int) -> int:
    try:
        return macs_at_720p(copy.deepcopy(module).to("meta"), scale, device="meta")
    except (NotImplementedError, RuntimeError):
        return macs_at_720p(module, scale)


def wide_branch_filter(network: ClassSRNet) -> StateFilter:
    """Filter of ClassSR checkpoints: keeps the wide branch's keys (``branches.<K-1>.``) when present, so a
    ClassSR, backbone (``network.*``) or plain state dict all load into the wide branch."""
    return strip_prefix(f"branches.{network.num_classes - 1}.")


def load_reference_weights(network: ClassSRNet, path: str) -> None:
    """Loads the wide branch from a backbone checkpoint (``network.*``), a ClassSR checkpoint or a state dict,
    through :func:`effsr.weights.load_network_state` (``weights_only``: a pickle that needs code is refused)."""
    load_network_state(network.branches[-1], path, prefix="network.", filter_fn=wide_branch_filter(network),
                       what="reference_checkpoint")


def _instantiate(spec: Any) -> Any:
    """``{class_path, init_args}`` dicts (nested ones too) as objects; other values unchanged."""
    if isinstance(spec, dict) and "class_path" in spec:
        path = spec["class_path"]
        module_name, _, class_name = path.rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"class_path '{path}' not found") from error
        return target(**{key: _instantiate(value) for key, value in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {key: _instantiate(value) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_instantiate(value) for value in spec]
    return spec


def load_split_model(argument: str, scale: int) -> nn.Module:
    """The network ``split_model`` names: an effsr checkpoint (its run's ``config.yaml`` found as ``effsr
    compare`` finds it) or ``CKPT@CONFIG.yaml``; a ClassSR model scores with its wide branch. Weights go
    through :func:`effsr.weights.load_network_state`; the scale must be ``scale``."""
    import yaml

    from effsr.compare.models import parse_model

    try:
        spec = parse_model(argument)
    except (CheckpointError, ConfigError) as error:
        raise ConfigError(f"model.init_args.split_model: {error}") from error
    if spec.checkpoint is None or not spec.configs:
        raise ConfigError(f"model.init_args.split_model '{argument}' must be a checkpoint (or CKPT@CONFIG.yaml)")
    config = yaml.safe_load(spec.configs[-1].read_text()) or {}
    trained_scale = (config.get("data") or {}).get("scale")
    if trained_scale is not None and int(trained_scale) != int(scale):
        raise ConfigError(f"split_model '{argument}' is a x{trained_scale} model ({spec.configs[-1]}), "
                          f"this run is x{scale}; give a model of the same scale")
    network_spec = copy.deepcopy(((config.get("model") or {}).get("init_args") or {}).get("network"))
    if not isinstance(network_spec, dict) or "class_path" not in network_spec:
        raise ConfigError(f"split_model '{argument}': {spec.configs[-1]} has no model.init_args.network")
    network_spec.setdefault("init_args", {}).setdefault("scale", int(scale))
    network = _instantiate(network_spec)
    load_network_state(network, spec.checkpoint, prefix="network.", what="split_model")
    scorer = network.branches[-1] if isinstance(network, ClassSRNet) else network
    if int(getattr(scorer, "scale", scale)) != int(scale):
        raise ConfigError(f"split_model '{argument}' upsamples by x{scorer.scale}, this run is x{scale}")
    return scorer.eval().requires_grad_(False)


def backbone_config(spec: dict[str, Any], run_config: dict[str, Any] | None, scale: int) -> dict[str, Any]:
    """The config of a branch saved alone: the run's config (data, trainer without callbacks) with the model
    replaced by a plain :class:`effsr.models.SRModule` of the branch's backbone."""
    config = copy.deepcopy(run_config or {})
    config.pop("ckpt_path", None)
    trainer = dict(config.get("trainer") or {})
    trainer.pop("callbacks", None)
    trainer["logger"] = False
    config["trainer"] = trainer
    config["model"] = {"class_path": "effsr.models.SRModule", "init_args": {"network": copy.deepcopy(spec)}}
    data = dict(config.get("data") or {})
    data["scale"] = int(scale)
    config["data"] = data
    return config


def export_backbone(branch: nn.Module, folder: Path, name: str, spec: dict[str, Any] | None,
                    run_config: dict[str, Any] | None, scale: int, info: dict[str, Any]) -> Path:
    """Writes ``folder/<name>.ckpt`` (atomically): ``branch`` as the ``network`` of a plain SRModule checkpoint,
    which ``effsr test``/``effsr compare`` evaluate and ``reference_checkpoint``/``split_model`` load; and
    ``folder/config.yaml`` (:func:`backbone_config`) when the branch's backbone spec is known."""
    import lightning
    import yaml

    from effsr.checkpointing import atomic_torch_save

    folder.mkdir(parents=True, exist_ok=True)
    state = {f"network.{key}": value.detach().cpu().clone() for key, value in branch.state_dict().items()}
    checkpoint = {"state_dict": state, "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": int(info.get("global_step", 0)), "classsr_export": dict(info)}
    path = folder / f"{name}.ckpt"
    atomic_torch_save(checkpoint, path)
    if spec:
        handle, temporary = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=folder)
        with os.fdopen(handle, "w") as stream:
            yaml.safe_dump(backbone_config(spec, run_config, scale), stream, sort_keys=False)
        os.replace(temporary, folder / "config.yaml")
    return path
