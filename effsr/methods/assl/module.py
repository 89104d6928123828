"""ASSLModule: the ASSL pipeline (dense → ssa → regularize → stabilize → prune → finetune) as an SRModule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from effsr.checkpointing import save_side_checkpoint
from effsr.errors import CheckpointError, ConfigError
from effsr.loggers import log_bar_chart, log_histograms
from effsr.methods.assl.channels import ChannelGroup, ChannelStructure, analyze_channels
from effsr.methods.assl.deploy import _DeployCache, cached_deploy, deploy_network
from effsr.methods.assl.losses import GrowingL2, SSAThreshold, ssa_loss
from effsr.methods.assl.plan import (
    CRITERIA,
    Criterion,
    Ranking,
    group_importance,
    num_kept,
    pruned_indices,
    scale_stats,
    top_indices,
)
from effsr.methods.assl.surgery import apply_shapes, conv_shapes, prune_network, reinitialize
from effsr.methods.assl.weight_norm import WNConv2d, convert_to_weight_norm
from effsr.models.base import SRModule, _default_optimizer
from effsr.weights import load_network_state

PHASES = ("dense", "ssa", "regularize", "stabilize", "prune", "finetune")


class ASSLModule(SRModule):
    """ASSL pipeline on any EDSR-like network (LEDSR in the paper); phases are driven by ``PhaseSchedule``.

    Phases (names in the YAML): ``dense`` (optional plain L1; ``until: dense_ready`` ends it at once when a
    ``dense_checkpoint`` was loaded), ``ssa`` (WN conversion, L1 + SSA on constrained layers, growing L2 on
    free layers), ``regularize`` (constrained pruned set fixed; growing L2 everywhere; ``until:
    reg_limit_reached``), ``stabilize`` (α held), ``prune`` (fold γ, remove channels; 0 steps is fine),
    ``finetune`` (plain L1 on the compact network; prunes first if no ``prune`` phase ran).

    Args:
        network: the dense backbone (e.g. ``effsr.archs.LEDSR``).
        prune_ratio: local fraction of filters pruned per layer (paper: 0.80859375 = keep 49 of 256).
        keep: absolute kept filters per layer; overrides ``prune_ratio``.
        keep_multiple_of: round kept counts to a multiple (8/16) for hardware-friendly widths.
        constrained_ranking: ``first`` (paper: rank the constrained set by the first constrained layer's |γ|)
            or ``sum`` (sum of |γ| over all constrained layers).
        skip_layers: ``fnmatch`` patterns of convs never pruned.
        ssa_weight: weight of the SSA loss.
        reg_interval / reg_step / reg_limit: growing-L2 schedule (paper 20 / 1e-4 / 0.5).
        reg_bias: also penalise the pruned filters' biases (½·α·(γ² + b²)).
        free_reg_in_ssa: free layers start their growing L2 with the ``ssa`` phase (else with ``regularize``).
        ssa_threshold: ``kept`` (official: t_l = γ of the smallest kept filter, with its gradient) or
            ``detached`` (the largest pruned |γ|, detached); see :func:`ssa_loss`.
        repick_after_ssa: at the end of ``ssa`` the free layers re-pick their pruned filters from the |γ| then
            (official); false keeps the picks made when ``ssa`` began.
        weight_norm: ``all`` (official ``--wn``): every trainable conv is weight-normalised during pruning, the
            upsampler conv included; ``pruned``: only the convs whose filters are pruned.
        prune_criterion: what ranks filters when a plan is made: ``scale`` (|γ|, ASSL) or ``l1_norm`` (per-filter
            mean |W|: the L1-norm pruning baseline when ``prune`` runs on a dense-loaded network).
        reinit_after_prune: re-initialise every conv right after the physical prune (official ``--reinit``):
            the compact architecture trained from scratch.
        save_pruned: write ``<default_root_dir>/pruned/pruned.ckpt`` right after the prune (its PSNR before
            finetuning can then be evaluated).
        dense_checkpoint: optional dense weights to start from (Lightning checkpoint or plain state dict).
        fused_inference: validation/test/predict run :func:`deploy_network`'s fused copy (cached, rebuilt when
            a weight changes) instead of the plain network; false runs the plain network.
        **kwargs: :class:`effsr.models.SRModule` options (tiling, image logging, results_dir).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        prune_ratio: float = 0.80859375,
        keep: int | None = None,
        keep_multiple_of: int | None = None,
        constrained_ranking: Ranking = "first",
        skip_layers: list[str] | None = None,
        ssa_weight: float = 1.0,
        reg_interval: int = 20,
        reg_step: float = 1e-4,
        reg_limit: float = 0.5,
        reg_bias: bool = True,
        free_reg_in_ssa: bool = True,
        ssa_threshold: SSAThreshold = "kept",
        repick_after_ssa: bool = True,
        weight_norm: Literal["all", "pruned"] = "all",
        prune_criterion: Criterion = "scale",
        reinit_after_prune: bool = False,
        save_pruned: bool = True,
        dense_checkpoint: str | None = None,
        fused_inference: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        if constrained_ranking not in ("first", "sum"):
            raise ConfigError(f"constrained_ranking must be 'first' or 'sum', got {constrained_ranking!r}")
        if ssa_threshold not in ("kept", "detached"):
            raise ConfigError(f"ssa_threshold must be 'kept' or 'detached', got {ssa_threshold!r}")
        if weight_norm not in ("all", "pruned"):
            raise ConfigError(f"weight_norm must be 'all' or 'pruned', got {weight_norm!r}")
        if prune_criterion not in CRITERIA:
            raise ConfigError(f"prune_criterion must be one of {', '.join(CRITERIA)}, got {prune_criterion!r}")
        num_kept(8, prune_ratio if keep is None else None, keep, None)
        self.prune_ratio = prune_ratio
        self.keep = keep
        self.keep_multiple_of = keep_multiple_of
        self.constrained_ranking: Ranking = constrained_ranking
        self.skip_layers = list(skip_layers or [])
        self.ssa_weight = ssa_weight
        self.reg_bias = reg_bias
        self.free_reg_in_ssa = free_reg_in_ssa
        self.ssa_threshold: SSAThreshold = ssa_threshold
        self.repick_after_ssa = repick_after_ssa
        self.weight_norm = weight_norm
        self.prune_criterion: Criterion = prune_criterion
        self.reinit_after_prune = reinit_after_prune
        self.save_pruned = save_pruned
        self.prune_stats: dict[str, dict[str, float]] = {}
        self.growth = GrowingL2(reg_interval, reg_step, reg_limit)
        self.dense_checkpoint = dense_checkpoint
        self.stage: Literal["dense", "wn", "compact"] = "dense"
        self.plan: dict[str, list[int]] = {}
        self.producers: dict[str, list[str]] = {}
        self._structure: ChannelStructure | None = None
        self.fused_inference = fused_inference
        self._deploy_cache: _DeployCache | None = None

    def on_setup(self, stage: str) -> None:
        """Starts from ``dense_checkpoint`` when given (a resumed or tested checkpoint then overrides it)."""
        if self.dense_checkpoint:
            load_dense_weights(self.network, self.dense_checkpoint)

    @property
    def structure(self) -> ChannelStructure:
        """Free/constrained groups of the (dense or WN) network; traced once."""
        if self._structure is None:
            if self.stage == "compact":
                raise ConfigError("the network is already pruned; its channel structure is final")
            self._structure = analyze_channels(self.network, self.skip_layers)
            if not self._structure.groups:
                raise ConfigError(f"ASSL found no prunable conv in {type(self.network).__name__}")
        return self._structure

    def _kept_count(self, group: ChannelGroup) -> int:
        ratio = None if self.keep is not None else self.prune_ratio
        return num_kept(group.channels, ratio, self.keep, self.keep_multiple_of)

    def _select(self, groups: Iterable[ChannelGroup]) -> None:
        """Fixes the kept set of groups that have none yet (ranked by |γ| now)."""
        pending = [group for group in groups if group.key not in self.plan]
        for group in pending:
            importance = group_importance(self.network, group, self.constrained_ranking, self.prune_criterion)
            self.plan[group.key] = top_indices(importance, self._kept_count(group))
            self.producers[group.key] = list(group.producers)
        if pending:
            self._log_widths("assl/planned_widths")

    def _weight_norm_names(self) -> list[str]:
        """Convs made WN: the pruned ones, and with ``weight_norm="all"`` every other trainable zero-padded conv."""
        names = [name for group in self.structure.groups for name in group.producers]
        if self.weight_norm == "all":
            names += [name for name, module in self.network.named_modules()
                      if isinstance(module, nn.Conv2d) and module.weight.requires_grad
                      and module.padding_mode == "zeros" and name not in names]
        return names

    def _to_weight_norm(self, names: list[str] | None = None) -> bool:
        if self.stage != "dense":
            return False
        convert_to_weight_norm(self.network, self._weight_norm_names() if names is None else names)
        self.stage = "wn"
        return True

    def _prune(self) -> bool:
        if self.stage == "compact":
            return False
        self._to_weight_norm()
        self._select(self.structure.groups)
        self.prune_stats = scale_stats(self.network, self.structure, self.plan)
        self.network = prune_network(self.network, self.structure, self.plan)
        self.stage = "compact"
        self._cost_cache = None
        self._deploy_cache = None
        self._log_widths("assl/kept_widths")
        if self.save_pruned and self._trainer is not None:
            save_side_checkpoint(self.trainer, "pruned")
        if self.reinit_after_prune:
            reinitialize(self.network)
        return True

    def inference_network(self) -> torch.fx.GraphModule:
        """The current network for fast CPU inference: :func:`deploy_network` (folded, oneDNN-fused).

        Not :meth:`deployed_network`, which cost counting and ``effsr profile`` use (plain convs, counted params).
        """
        return deploy_network(self.network)

    def infer(self, lr: Tensor) -> Tensor:
        """Validation/test/predict: the cached :func:`deploy_network` copy when it may be used, else the network.

        The fused copy runs only when nothing can tell the difference: every module in eval mode, autograd
        off (``no_grad``/``inference_mode``: its weights are detached buffers) and no autocast (oneDNN calls
        are not autocast ops). It equals the network up to float rounding in every stage (γ folded first).
        """
        deployed = self._fused_network(lr) if self.fused_inference else None
        if deployed is None:
            return self.network(lr)
        return deployed(lr).contiguous()

    def _fused_network(self, lr: Tensor) -> nn.Module | None:
        network, self._deploy_cache = cached_deploy(self.network, lr.device.type, self._deploy_cache)
        return network

    def after_optimizer_step(self) -> None:
        """The optimizer step changed the weights (fused optimizers do not bump ``_version``): drop the copy."""
        self._deploy_cache = None

    def kept_widths(self) -> dict[str, int]:
        """Kept output channels per prunable conv, in graph order (planned before pruning)."""
        widths = {name: len(self.plan[key]) for key, names in self.producers.items() for name in names}
        return {name: widths[name] for name in conv_shapes(self.network) if name in widths}

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        if name not in PHASES:
            raise ConfigError(f"ASSLModule has no phase '{name}'; use {', '.join(PHASES)}")
        changed = super().on_phase_start(name, settings)
        self._deploy_cache = None
        step = self.global_step
        if name == "dense":
            if self.stage != "dense":
                raise ConfigError("the 'dense' phase must come before ssa/regularize/prune")
            return changed
        if name in ("ssa", "regularize", "stabilize"):
            if self.stage == "compact":
                raise ConfigError(f"phase '{name}' after pruning: order the phases ssa → regularize → prune")
            changed = self._to_weight_norm() or changed
            if name == "ssa":
                self._select(self.structure.free)
                if self.free_reg_in_ssa:
                    for group in self.structure.free:
                        self.growth.start(group.key, step)
            else:
                if name == "regularize" and self.repick_after_ssa:
                    # official: every layer's pruned set is re-picked when ssa ends, the free layers' too
                    for group in self.structure.free:
                        self.plan.pop(group.key, None)
                self._select(self.structure.groups)
                settings.setdefault("keep_optimizer_state", True)  # official: one Adam for ssa → stabilize
                for group in self.structure.groups:
                    self.growth.start(group.key, step)
            if name == "stabilize":
                self.growth.freeze(step)
            return changed
        return self._prune() or changed

    def phase_condition(self, name: str) -> bool:
        """``dense_ready``: a dense checkpoint was given; ``reg_limit_reached``: every α reached its limit."""
        if name == "dense_ready":
            return self.dense_checkpoint is not None
        if name == "reg_limit_reached":
            if self.stage != "wn":
                return False
            return self.growth.reached([group.key for group in self.structure.groups], self.global_step)
        return super().phase_condition(name)

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = F.l1_loss(self.network(lr), hr)
        logs: dict[str, Tensor] = {"l1": l1.detach()}
        loss = l1
        if self.stage == "wn":
            if self.phase_name == "ssa" and self.ssa_weight:
                alignment = self._ssa_term()
                loss = loss + self.ssa_weight * alignment
                logs["ssa"] = alignment.detach()
            penalty, alpha = self._reg_term()
            loss = loss + penalty
            logs["reg_penalty"] = penalty.detach()
            logs["reg_alpha"] = torch.tensor(alpha)
        return loss, logs

    def _ssa_term(self) -> Tensor:
        terms = []
        for group in self.structure.constrained:
            gammas = [self.network.get_submodule(name).gamma for name in group.producers]
            terms.append(ssa_loss(gammas, group.channels - self._kept_count(group), self.ssa_threshold))
        if not terms:
            return torch.zeros((), device=self.device)
        return torch.stack(terms).mean()

    def _reg_term(self) -> tuple[Tensor, float]:
        """½·α·Σ(γ² + b²) over pruned filters, and the largest current α (logged)."""
        penalty = torch.zeros((), device=self.device)
        largest = 0.0
        for group in self.structure.groups:
            alpha = self.growth.alpha(group.key, self.global_step)
            largest = max(largest, alpha)
            if alpha == 0.0 or group.key not in self.plan:
                continue
            pruned = torch.tensor(pruned_indices(group.channels, self.plan[group.key]), device=self.device,
                                  dtype=torch.long)
            for name in group.producers:
                conv = self.network.get_submodule(name)
                penalty = penalty + 0.5 * alpha * conv.gamma[pruned].square().sum()
                if self.reg_bias and conv.bias is not None:
                    penalty = penalty + 0.5 * alpha * conv.bias[pruned].square().sum()
        return penalty, largest

    def structure_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stage": self.stage, "plan": {k: list(v) for k, v in self.plan.items()},
                                 "producers": {k: list(v) for k, v in self.producers.items()},
                                 "growth": self.growth.state(), "prune_stats": self.prune_stats}
        if self.stage == "wn":
            state["weight_norm"] = [name for name, module in self.network.named_modules()
                                    if isinstance(module, WNConv2d)]
        if self.stage == "compact":
            state["shapes"] = conv_shapes(self.network)
        return state

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        if not state:
            return
        stage = state.get("stage", "dense")
        self.plan = {str(key): [int(i) for i in value] for key, value in (state.get("plan") or {}).items()}
        self.producers = {str(key): list(value) for key, value in (state.get("producers") or {}).items()}
        self.growth.load(state.get("growth") or {})
        self.prune_stats = dict(state.get("prune_stats") or {})
        if stage == "wn":
            self._to_weight_norm(state.get("weight_norm"))  # absent in older checkpoints: pruned convs only
        elif stage == "compact":
            if self.stage != "compact":
                apply_shapes(self.network, state["shapes"])
                self._structure = None
                self.stage = "compact"
        elif stage != "dense":
            raise CheckpointError(f"unknown ASSL stage {stage!r} in the checkpoint")
        self._cost_cache = None
        self._deploy_cache = None

    def cost_report(self) -> dict[str, float]:
        """Cost of the deployed network; before pruning also the cost the current plan will give."""
        report = super().cost_report()
        if self.stage == "wn" and len(self.plan) == len(self.structure.groups):
            from effsr.cost import count_params, macs_at_720p

            compact = prune_network(self.network, self.structure, self.plan).to("meta")
            report["planned_params"] = float(count_params(compact))
            report["planned_macs_720p"] = float(macs_at_720p(compact, self.scale, device="meta"))
        return report

    def on_eval_end(self, stage: str) -> None:
        """After each validation while the network is weight-normalised: histograms of |γ| per group kind."""
        if stage == "val" and self.stage == "wn":
            self._log_gamma_histograms()

    def _log_gamma_histograms(self) -> None:
        values: dict[str, Tensor] = {}
        for kind, groups in (("constrained", self.structure.constrained), ("free", self.structure.free)):
            gammas = [self.network.get_submodule(name).gamma.detach().abs().float().cpu()
                      for group in groups for name in group.producers]
            if gammas:
                values[f"assl/gamma_{kind}"] = torch.cat(gammas)
        log_histograms(self.loggers, values, self.global_step)

    def _log_widths(self, key: str) -> None:
        """Per-layer kept widths: a bar chart in W&B, summary scalars for every logger."""
        if self._trainer is None:
            return
        widths = self.kept_widths()
        if not widths:
            return
        log_bar_chart(self.loggers, key, widths, ("layer", "kept"), title=key, step=self.global_step)
        for logger in self.loggers:
            logger.log_metrics({f"{key}_mean": float(sum(widths.values()) / len(widths)),
                                f"{key}_min": float(min(widths.values()))}, step=self.global_step)


def load_dense_weights(network: nn.Module, path: str) -> None:
    """Loads dense backbone weights from an effsr/Lightning checkpoint (``network.*`` keys) or a plain state dict,
    through the safe loader (:func:`effsr.weights.load_network_state`)."""
    load_network_state(network, path, what="dense_checkpoint")
