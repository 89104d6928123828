"""ClassSR (Kong et al., CVPR 2021): a patch classifier routes LR sub-images to K branches of growing width.

Pieces: :class:`Classifier`, :class:`ClassSRNet` (branches + classifier), the losses :func:`class_loss`
(L_class) and :func:`average_loss` (L_avg), and :class:`ClassSRModule` with the phases
reference -> split -> branches -> classifier -> joint and routed tiled inference.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.inference.tiling import routed_forward
from effsr.models.base import SRModule


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

    def forward(self, lr: Tensor) -> Tensor:
        """Returns class logits (N, K) for LR patches in [0, pixel_range]."""
        features = self.features(lr / self.pixel_range).mean(dim=(2, 3))
        return self.linear(features)


def class_loss(probabilities: Tensor) -> Tensor:
    """L_class: negative summed pairwise |p_i - p_j| per sample (pushes probabilities to one-hot), batch mean."""
    differences = probabilities.unsqueeze(2) - probabilities.unsqueeze(1)
    return -differences.abs().sum(dim=(1, 2)).mean() / 2


def average_loss(probabilities: Tensor) -> Tensor:
    """L_avg: sum over classes of |sum_batch p_i - B/K| (equal use of the classes over the batch)."""
    batch, num_classes = probabilities.shape
    return (probabilities.sum(dim=0) - batch / num_classes).abs().sum()


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenates ``tensor`` over all DDP ranks keeping gradients (identity when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


class ClassSRNet(nn.Module):
    """K branch networks (narrow first) and a classifier; soft mixture in training, argmax routing in inference."""

    def __init__(self, branches: list[nn.Module], classifier: Classifier | None = None) -> None:
        super().__init__()
        if len(branches) < 2:
            raise ValueError("ClassSRNet needs at least two branches")
        self.branches = nn.ModuleList(branches)
        self.scale = int(branches[0].scale)
        self.pixel_range = float(getattr(branches[0], "pixel_range", 1.0))
        self.classifier = classifier or Classifier(len(branches), pixel_range=self.pixel_range)

    def forward(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (sum_k p_k * branch_k(lr), class probabilities)."""
        probabilities = F.softmax(self.classifier(lr), dim=1)
        outputs = torch.stack([branch(lr) for branch in self.branches], dim=1)
        return (outputs * probabilities[:, :, None, None, None]).sum(dim=1), probabilities


class ClassSRModule(SRModule):
    """ClassSR training phases and routed inference; ``network`` is a :class:`ClassSRNet`."""

    def __init__(self, network: ClassSRNet, loss_weights: tuple[float, float, float] = (1000.0, 0.5, 3.0),
                 patch_size: int = 32, overlap: int = 4, force_branch: int | None = None, **kwargs: Any) -> None:
        super().__init__(network=network, **kwargs)
        self.loss_weights = tuple(loss_weights)
        self.patch_size = patch_size
        self.overlap = overlap
        self.force_branch = force_branch
        self.split_thresholds: list[float] = []

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Reference/branches phases: L1 of the wide branch; classifier/joint: w1*L1 + w2*L_class + w3*L_avg."""
        phase = getattr(self, "phase_name", None)
        if phase in ("classifier", "joint"):
            sr, probabilities = self.network(lr)
            l1 = F.l1_loss(sr, hr) / self.network.pixel_range
            l_class = class_loss(probabilities)
            l_avg = average_loss(gather_with_grad(probabilities))
            w1, w2, w3 = self.loss_weights
            loss = w1 * l1 + w2 * l_class + w3 * l_avg
            return loss, {"l1": l1.detach(), "l_class": l_class.detach(), "l_avg": l_avg.detach()}
        sr = self.network.branches[-1](lr)
        loss = F.l1_loss(sr, hr)
        return loss, {"l1": loss.detach()}

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        """Sets the trainable set: reference/branches -> branches, classifier -> classifier, joint -> all."""
        train_classifier = name in ("classifier", "joint")
        train_branches = name != "classifier"
        for parameter in self.network.classifier.parameters():
            parameter.requires_grad_(train_classifier)
        for parameter in self.network.branches.parameters():
            parameter.requires_grad_(train_branches)
        return True

    def policy(self, patches: Tensor) -> Tensor:
        """Branch index per LR patch: classifier argmax or the forced branch."""
        if self.force_branch is not None:
            return torch.full((patches.shape[0],), self.force_branch, dtype=torch.long, device=patches.device)
        return self.network.classifier(patches).argmax(dim=1)

    def infer(self, lr: Tensor) -> Tensor:
        """Routed tiled inference over the whole image."""
        outputs = [routed_forward(lr[i:i + 1], list(self.network.branches), self.network.scale, self.policy,
                                  patch_size=self.patch_size, overlap=self.overlap).sr for i in range(lr.shape[0])]
        return torch.cat(outputs, dim=0)

    def structure_state(self) -> dict[str, Any]:
        """The split thresholds."""
        return {"split_thresholds": list(self.split_thresholds)}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        """Restores the split thresholds."""
        self.split_thresholds = list(state.get("split_thresholds", []))
