"""ClassSR's networks: the patch :class:`Classifier`, :class:`ClassSRNet` (K branches + classifier, the soft
mixture of training) and :class:`RoutedClassSR` (argmax routing over tiled patches, as deployed)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.archs.common import check_scale
from effsr.errors import ConfigError
from effsr.inference.tiling import RoutedOutput, routed_forward
from effsr.methods.classsr.cost import routed_costs


class Classifier(nn.Module):
    """ClassSR patch classifier: conv4x4/s4 -> 3x conv1x1 -> conv1x1(32) -> global avg pool -> linear.

    ``init_scale`` multiplies the convs' Kaiming-normal weights (official 0.1). At 0.1 the five convs pass the
    input on at ~1e-5 of its size, so training moves the biases (a constant routing that L_avg balances batch
    by batch) and the logits' dependence on the patch can shrink instead of grow (docs/classsr.md); 1.0 is
    effsr's option.
    """

    def __init__(self, num_classes: int = 3, width: int = 128, pixel_range: float = 1.0,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        if not init_scale > 0:
            raise ConfigError(f"Classifier init_scale must be > 0 (official 0.1), got {init_scale}")
        self.init_scale = float(init_scale)
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=4), nn.LeakyReLU(0.1, inplace=True)]
        for _ in range(3):
            layers += [nn.Conv2d(width, width, 1), nn.LeakyReLU(0.1, inplace=True)]
        layers += [nn.Conv2d(width, 32, 1)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(32, num_classes)
        self.pixel_range = pixel_range
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation: convs Kaiming-normal (fan-in) x 0.1 (``init_scale``) with zero bias, the
        linear layer PyTorch's default. The small start keeps the first class probabilities near uniform."""
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                module.weight.data.mul_(self.init_scale)
                nn.init.zeros_(module.bias)

    def forward(self, lr: Tensor) -> Tensor:
        """Returns class logits (N, K) for LR patches in [0, pixel_range]."""
        features = self.features(lr / self.pixel_range).mean(dim=(2, 3))
        return self.linear(features)


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
    The backbone contract: ``scale`` first (checked; taken from the branches when they are given),
    ``pixel_range``, and ``forward(lr)`` returns one SR tensor (the soft mixture, :meth:`mixture` also gives
    the class probabilities). ``classifier_init_scale``: the built classifier's conv init scale (official 0.1).
    """

    def __init__(self, scale: int | None = None, branches: list[nn.Module] | None = None,
                 classifier: Classifier | None = None, *, backbone: str | None = None,
                 widths: list[int] | None = None, width_arg: str = "num_features",
                 backbone_args: dict[str, Any] | None = None, pixel_range: float | None = None,
                 classifier_init_scale: float = 0.1) -> None:
        super().__init__()
        if scale is not None:
            scale = check_scale(scale)
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
        self.classifier = classifier or Classifier(len(branches), pixel_range=self.pixel_range,
                                                   init_scale=classifier_init_scale)

    @property
    def num_classes(self) -> int:
        return len(self.branches)

    def mixture(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (sum_k p_k * branch_k(lr), class probabilities): what training optimises."""
        probabilities = F.softmax(self.classifier(lr), dim=1)
        outputs = torch.stack([branch(lr) for branch in self.branches], dim=1)
        return (outputs * probabilities[:, :, None, None, None]).sum(dim=1), probabilities

    def forward(self, lr: Tensor) -> Tensor:
        """The soft mixture sum_k p_k * branch_k(lr) (training's output; inference routes, :class:`RoutedClassSR`)."""
        return self.mixture(lr)[0]


class RoutedClassSR(nn.Module):
    """ClassSR as deployed: per LR patch the classifier's argmax (or ``force_branch``) picks one branch; routed
    tiling (:func:`effsr.inference.tiling.routed_forward`) covers the whole image with overlap averaging; the
    branches run in their deploy form (convolutions fused with their activations, :mod:`effsr.inference.deploy`).

    ``proportions`` (with ``proportions_source`` saying where they come from) are the class shares its cost is
    reported at: :meth:`profile_costs`, the hook :func:`effsr.profile.profile_network` uses instead of counting
    one forward (routing depends on the image, the cost is defined at the class proportions).
    """

    def __init__(self, network: ClassSRNet, patch_size: int = 32, stride: int = 28, batch_size: int | None = None,
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
                              batch_size=self.batch_size, count_macs=count_macs, deploy=True)

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
