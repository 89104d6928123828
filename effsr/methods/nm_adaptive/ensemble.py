"""An ensemble of N:M networks with one MSE estimator each, routed per patch; loading a member checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.inference.tiling import routed_forward
from effsr.methods.nm_adaptive.estimator import MSEEstimator, patch_mse
from effsr.methods.nm_sparsity.convert import convert_to_nm, nm_layers, nm_macs_720p
from effsr.weights import load_network_state, read_checkpoint, state_dict_of, strip_prefix

__all__ = ["NMEnsemble", "build_member", "load_nm_member", "member_cost", "member_structure"]


class NMEnsemble(nn.Module):
    """Networks of one backbone at several budgets + one MSE estimator each; forward = routed inference.

    Estimated MSE (per LR patch, of the member's output vs HR, in [0, 1] units of Y when ``y_channel``):
    with ``relative`` (default) the estimator of the reference member (the most expensive) predicts
    log MSE_ref and every other estimator k predicts log(MSE_k / MSE_ref), so est_MSE_k = exp(e_ref + e_k):
    the routing decision depends on the differences between members, which are much smaller than the spread of
    MSE between patches, and are learnt directly. Without ``relative`` each estimator predicts its own log MSE.
    """

    def __init__(self, members: Sequence[nn.Module], costs: Sequence[float], estimator_features: int = 16,
                 penalty: float = 0.0, target_cost: float | None = None, patch_size: int = 32,
                 overlap: int = 4, relative: bool = True, y_channel: bool = True) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = int(members[0].scale)
        self.pixel_range = float(members[0].pixel_range)
        self.estimators = nn.ModuleList(MSEEstimator(self.pixel_range, estimator_features) for _ in members)
        self.register_buffer("costs", torch.tensor(list(costs), dtype=torch.float32))
        self.penalty, self.target_cost = penalty, target_cost
        self.patch_size, self.overlap = patch_size, overlap
        self.relative, self.y_channel = relative, y_channel
        self.last_route: Any = None

    @property
    def reference(self) -> int:
        """Index of the most expensive member (the reference of relative estimates)."""
        return int(self.costs.argmax())

    @torch.no_grad()
    def member_mse(self, lr: Tensor, hr: Tensor) -> Tensor:
        """(P, K) actual MSE of every (frozen) member on every patch (inputs in [0, pixel_range])."""
        return torch.stack([patch_mse(member(lr), hr, self.pixel_range, self.y_channel)
                            for member in self.members], dim=1)

    def targets(self, mse: Tensor) -> Tensor:
        """(P, K) what the estimators learn: log MSE, or log MSE_ref and log(MSE_k / MSE_ref) when relative."""
        log_mse = mse.clamp_min(1e-10).log()
        if not self.relative:
            return log_mse
        reference = log_mse[:, self.reference:self.reference + 1]
        relative = log_mse - reference
        relative[:, self.reference] = reference[:, 0]
        return relative

    def outputs(self, patches: Tensor) -> Tensor:
        """(P, K) raw estimator outputs (same parameterisation as :meth:`targets`)."""
        return torch.stack([estimator(patches) for estimator in self.estimators], dim=1)

    def to_mse(self, outputs: Tensor) -> Tensor:
        """Estimator outputs → (P, K) estimated MSE."""
        if not self.relative:
            return outputs.exp()
        reference = outputs[:, self.reference:self.reference + 1]
        log_mse = outputs + reference
        log_mse[:, self.reference] = reference[:, 0]
        return log_mse.exp()

    @torch.no_grad()
    def initialise_estimators(self, targets: Tensor) -> None:
        """Centres every estimator's output on the mean of its targets (call once, before training)."""
        for estimator, mean in zip(self.estimators, targets.mean(dim=0), strict=True):
            estimator.shift.fill_(float(mean))

    def estimator_loss(self, patches: Tensor, mse: Tensor) -> Tensor:
        """Mean squared error between the estimators' outputs and :meth:`targets` of the actual MSE."""
        return F.mse_loss(self.outputs(patches), self.targets(mse))

    def estimate(self, patches: Tensor) -> Tensor:
        """(P, K) estimated MSE of every network on every patch."""
        return self.to_mse(self.outputs(patches))

    def choose(self, estimated: Tensor) -> Tensor:
        """argmin_k est_k + λ·cost_k; with ``target_cost`` λ is bisected so the mean cost ≤ target."""
        costs = self.costs.to(estimated)
        if self.target_cost is None:
            return (estimated + self.penalty * costs).argmin(dim=1)
        low, high = 0.0, float(estimated.max()) / max(1e-12, float(costs.max() - costs.min())) + 1.0
        for _ in range(40):
            middle = (low + high) / 2
            if float(costs[(estimated + middle * costs).argmin(dim=1)].mean()) > self.target_cost:
                low = middle
            else:
                high = middle
        return (estimated + high * costs).argmin(dim=1)

    def policy(self, patches: Tensor) -> Tensor:
        return self.choose(self.estimate(patches))

    def forward(self, lr: Tensor) -> Tensor:
        """Routed SR of one image (batch size 1) through the shared tiling."""
        outputs = []
        for image in lr.split(1):
            routed = routed_forward(image, list(self.members), self.scale, self.policy, patch_size=self.patch_size,
                                    overlap=self.overlap)
            self.last_route = routed
            outputs.append(routed.sr)
        return torch.cat(outputs)



def member_cost(network: nn.Module) -> float:
    """MACs at 720p of ``network`` (N:M layers at N/M) as a fraction of the same backbone dense."""
    layers = nm_layers(network)
    if not layers:
        return 1.0
    macs, dense = nm_macs_720p(network)
    return macs / dense


def build_member(network: nn.Module, fixed_n: dict[str, int | None] | None, m: int) -> nn.Module:
    """Makes ``network`` (in place) the structure of a member: unchanged when ``fixed_n`` is None (dense), else its
    N:M layers with these frozen N (a layer without one freezes at its current N). Idempotent."""
    if fixed_n is None:
        return network
    if not nm_layers(network):
        convert_to_nm(network, m)
    for name, layer in nm_layers(network).items():
        fixed = fixed_n.get(name)
        layer.freeze(fixed if fixed is not None else None)
    return network


def member_structure(network: nn.Module) -> dict[str, int | None] | None:
    """What :func:`build_member` needs to rebuild ``network``: its frozen N per N:M layer, None when dense."""
    layers = nm_layers(network)
    return {name: layer.fixed_n for name, layer in layers.items()} if layers else None


def load_nm_member(backbone: nn.Module, path: str | None, m: int, what: str = "member checkpoint"
                   ) -> tuple[nn.Module, float]:
    """A copy of ``backbone`` loaded from an N:M (or dense, ``path=None`` = as given) checkpoint through the safe
    loader (:func:`effsr.weights.read_checkpoint`), with its cost as a fraction of the dense network's MACs at 720p.
    ``what`` names the option in errors."""
    network = copy.deepcopy(backbone)
    if path is None:
        return network, 1.0
    checkpoint = read_checkpoint(path, what)
    state = strip_prefix("network.")(strip_prefix("module.")(state_dict_of(checkpoint, path, what)))
    if any(key.endswith(".rank") for key in state):
        structure = checkpoint.get("effsr", {}).get("structure", {})
        build_member(network, dict(structure.get("fixed_n", {})), int(structure.get("m", m)))
    load_network_state(network, path, what=what)
    return network, member_cost(network)
