"""Adaptive patch inference over N:M networks: :class:`AdaptiveNMModule` trains the estimators and evaluates the
routed ensemble with measured MACs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from effsr.cost import MacCounter, count_params
from effsr.methods.nm_adaptive.ensemble import (
    NMEnsemble,
    build_member,
    load_nm_member,
    member_cost,
    member_structure,
)
from effsr.models.base import SRModule, _default_optimizer

__all__ = ["AdaptiveNMModule"]


class AdaptiveNMModule(SRModule):
    """Adaptive patch inference over an ensemble of N:M networks (phase ``estimators`` trains the estimators).

    Args:
        network: the backbone (same config as the members were trained with; its weights are not used when
            ``checkpoints`` are given).
        checkpoints: one checkpoint path per member (``null`` = the backbone as configured, e.g. dense).
        m: M the members were trained with.
        penalty: λ of argmin_k est_MSE_k + λ·cost_k (cost = fraction of the dense MACs).
        target_cost: instead of λ, a target mean cost fraction per image (λ found by bisection).
        patch_size / overlap: LR routing patches (train the estimators on LR patches of ``patch_size``).
        relative / y_channel: estimator parameterisation and MSE channel (see :class:`NMEnsemble`).
    """

    def __init__(self, network: nn.Module, checkpoints: Sequence[str | None] = (None,),
                 optimizer: OptimizerCallable = _default_optimizer, lr_scheduler: LRSchedulerCallable | None = None,
                 m: int = 8, penalty: float = 0.0, target_cost: float | None = None, patch_size: int = 32,
                 overlap: int = 4, estimator_features: int = 16, relative: bool = True, y_channel: bool = True,
                 **kwargs: Any) -> None:
        # members start as copies of the backbone; their files are read in on_setup (no I/O here)
        members = [copy.deepcopy(network) for _ in checkpoints]
        ensemble = NMEnsemble(members, [1.0] * len(members), estimator_features, penalty, target_cost, patch_size,
                              overlap, relative, y_channel)
        super().__init__(ensemble, optimizer, lr_scheduler, **kwargs)
        self.checkpoints, self.m = list(checkpoints), m
        self._freeze_members()
        self._measured: dict[str, float] = {}
        self.register_buffer("estimators_initialised", torch.zeros((), dtype=torch.bool))

    @property
    def ensemble(self) -> NMEnsemble:
        return self.network

    def _freeze_members(self) -> None:
        for parameter in self.ensemble.members.parameters():
            parameter.requires_grad_(False)

    def _set_costs(self) -> None:
        self.ensemble.costs.copy_(torch.tensor([member_cost(member) for member in self.ensemble.members]))

    def on_setup(self, stage: str) -> None:
        """Loads every member file (safe loader; the option is named in errors) and sets the members' costs; a
        resumed or tested checkpoint then overrides the weights (its structure was rebuilt first)."""
        for index, path in enumerate(self.checkpoints):
            if path is None:
                continue
            member, _cost = load_nm_member(self.ensemble.members[index], path, self.m,
                                           what=f"model.init_args.checkpoints[{index}]")
            self.ensemble.members[index] = member
        self._freeze_members()
        self._set_costs()

    def structure_state(self) -> dict[str, Any]:
        """Each member's frozen N per N:M layer (None = dense), so a checkpoint rebuilds them without the files."""
        return {"m": self.m, "members": [member_structure(member) for member in self.ensemble.members]}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        for member, fixed_n in zip(self.ensemble.members, state.get("members", []), strict=False):
            build_member(member, fixed_n, int(state.get("m", self.m)))
        if state.get("members"):
            self._freeze_members()
            self._set_costs()

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.ensemble.estimators.parameters())

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Squared error between the estimators' outputs and the log (relative) per-patch MSE of the frozen
        members; the first batch centres the estimators' outputs."""
        self.ensemble.members.eval()
        mse = self.ensemble.member_mse(lr, hr)
        if not bool(self.estimators_initialised):
            self.ensemble.initialise_estimators(self.ensemble.targets(mse))
            self.estimators_initialised.fill_(True)
        loss = self.ensemble.estimator_loss(lr, mse)
        return loss, {"estimator_mse": loss.detach()}

    def infer(self, lr: Tensor) -> Tensor:
        """Routed inference; in evaluation the executed MACs (estimators included), HR pixels and patches per
        member are measured per image."""
        with MacCounter(self.ensemble) as counter:
            sr = self.ensemble(lr)
        routes = self.ensemble.last_route.patches_per_network.tolist()
        self.add_measurement(macs=counter.macs, pixels=sr.shape[-2] * sr.shape[-1] * sr.shape[0],
                             **{f"route_count{index}": count for index, count in enumerate(routes)})
        return sr

    def image_measurements(self, measured: dict[str, float], sr: Tensor, hr: Tensor) -> dict[str, Any]:
        """Per image: measured MACs per HR pixel scaled to 1280×720, and the patches per member."""
        if not measured.get("pixels"):
            return {}
        counts = [measured.get(f"route_count{index}", 0.0) for index in range(len(self.ensemble.costs))]
        return {"macs_720p": measured["macs"] / measured["pixels"] * 1280 * 720, "route_counts": counts}

    def set_measurements(self, images: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A set's mean ``macs_720p`` over its images, its share of patches per member and the cost fraction
        at those shares."""
        counts = torch.tensor([image["route_counts"] for image in images], dtype=torch.float64).sum(dim=0)
        share = counts / max(1.0, float(counts.sum()))
        return {"macs_720p": sum(image["macs_720p"] for image in images) / len(images),
                **{f"route_share{index}": float(value) for index, value in enumerate(share)},
                "mean_cost_fraction": float((share * self.ensemble.costs.double().cpu()).sum())}

    def on_eval_measured(self, stage: str, per_set: dict[str, dict[str, Any]], overall: dict[str, Any],
                         n_images: int) -> None:
        self._measured = dict(overall)

    def cost_report(self) -> dict[str, float]:
        """Measured cost of the routed inference over the images of the last evaluation (estimators
        included, per HR pixel scaled to 1280×720); per set: :meth:`set_measurements`."""
        report: dict[str, float] = {"params": float(count_params(self.ensemble)),
                                    "penalty": float(self.ensemble.penalty)}
        for index, cost in enumerate(self.ensemble.costs.tolist()):
            report[f"member{index}_cost_fraction"] = cost
        report.update(self._measured)
        return report

