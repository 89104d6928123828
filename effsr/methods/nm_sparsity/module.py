"""The SLS LightningModule: :class:`NMSparsityModule` (phases ``dense`` → ``search`` → ``finetune``).

The search phase adds λ·c·cost to the L1 loss (``cost_unit``: the official MACs of one training patch, or the
cost fraction of the N:M layers), with c ×``anneal_factor`` when the search stalls (``anneal_rule``: the official
compression-ratio gain per epoch, or effsr's cost-fraction drop). ``phase_condition("budget_reached")`` ends the
search; ``finetune`` freezes N (the remaining budget filled, or a warning when the search ended above budget).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from effsr.cost import count_params
from effsr.errors import CheckpointError, ConfigError
from effsr.loggers import log_bar_chart
from effsr.methods.nm_sparsity.convert import (
    convert_to_nm,
    export_masked,
    fill_budget,
    nm_layers,
    nm_macs_720p,
    patch_cost,
    sparse_cost_fraction,
)
from effsr.methods.nm_sparsity.layer import NMConv2d
from effsr.models.base import SRModule, _default_optimizer
from effsr.weights import load_network_state

__all__ = ["SCORE_GROUP", "AnnealRule", "CostUnit", "Mode", "NMSparsityModule", "ScoreClamp", "load_network_weights"]

Mode = Literal["search", "oneshot", "uniform", "srste"]
CostUnit = Literal["fraction", "patch_macs"]
AnnealRule = Literal["fraction", "ratio"]
ScoreClamp = Literal["forward", "inplace"]
SCORE_GROUP = "nm_scores"


def load_network_weights(network: nn.Module, path: str, what: str = "model.init_args.dense_checkpoint") -> None:
    """Loads a dense checkpoint (Lightning ``state_dict`` with ``network.`` keys, or a plain state_dict) into a
    dense or N:M network through the safe loader; the N:M buffers/scores it lacks keep their values."""
    load_network_state(network, path, what=what, ignore_missing=lambda key: key.endswith(("scores", "rank",
                                                                                              "dense_macs")))


class NMSparsityModule(SRModule):
    """Learned layer-wise N:M sparsity under a MACs budget (phases ``dense`` → ``search`` → ``finetune``).

    Args:
        m: group size M (4, 8, 16, 32; the paper uses 32).
        budget: target cost of the N:M layers as a fraction of their dense MACs (0.25 ≈ 8:32 on average).
        mode: ``search`` (SLS), ``oneshot`` (magnitude pattern, uniform ``uniform_n``, fixed), ``uniform``
            (uniform ``uniform_n``, magnitude pattern re-ranked every ``rerank_interval`` steps: SLS with N fixed
            to the same value in every layer) or ``srste`` (like ``uniform``, plus dense STE gradient + decay).
        uniform_n: N of every layer for the baselines (default: round(budget·M)).
        cost_weight: λ of the cost term, in the unit ``cost_unit`` says.
        cost_unit: ``fraction`` (effsr: λ·c·Σ(N/M)·dense / Σ dense, independent of network and patch size) or
            ``patch_macs`` (official: λ·c·Σ(N/M)·MACs of one training patch, λ = 1e-10 as written in
            ``train_sls_carnX4.sh``). λ_fraction = λ_patch_macs · Σ dense MACs of the N:M layers per patch.
        anneal_rule: ``fraction`` (effsr: every ``anneal_interval`` steps, c ×factor when the cost fraction fell
            by less than ``anneal_threshold``) or ``ratio`` (official: the compression ratio dense/sparse is
            recorded every ``anneal_interval`` steps (an epoch); at every second record, c ×factor when it grew by
            less than ``anneal_threshold`` (0.2) since the first of the pair).
        anneal_interval / anneal_threshold / anneal_factor: see ``anneal_rule``.
        rerank_interval: optimizer steps between magnitude re-rankings (0 = never; the official code: an epoch).
        rerank_after_freeze: keep re-ranking once N is frozen (official; N stays, which weights survive moves).
        score_clamp: ``forward`` (official: clamped to [0, ``score_max``] in the forward pass only, so a score
            outside gets no gradient) or ``inplace`` (effsr: the stored scores are clamped before every step).
        score_lr: learning rate of the priority scores (None = the weights' lr, as the official code).
        fill_budget: when the search ends below budget, raise N where it costs least per unit of the score
            ranking until the budget is spent (:func:`fill_budget`).
        srste_decay: SR-STE's λ_w on pruned weights.
        dense_checkpoint: dense checkpoint loaded into the backbone before conversion (then the condition
            ``dense_ready`` holds at once, so a ``dense`` phase ``until: dense_ready`` is skipped).
    """

    def __init__(self, network: nn.Module, optimizer: OptimizerCallable = _default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, m: int = 8, budget: float = 0.25,
                 mode: Mode = "search", uniform_n: int | None = None, cost_weight: float = 1.0,
                 cost_unit: CostUnit = "fraction", anneal_rule: AnnealRule = "fraction",
                 anneal_interval: int = 100, anneal_threshold: float = 0.01, anneal_factor: float = 1.2,
                 rerank_interval: int = 100, rerank_after_freeze: bool = False,
                 score_clamp: ScoreClamp = "inplace", score_lr: float | None = None, score_max: float = 1.03,
                 fill_budget: bool = True, srste_decay: float = 2e-4, dense_checkpoint: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(network, optimizer, lr_scheduler, **kwargs)
        if not 0 < budget <= 1:
            raise ConfigError(f"budget must be in (0, 1], got {budget}")
        for option, value, allowed in (("cost_unit", cost_unit, ("fraction", "patch_macs")),
                                       ("anneal_rule", anneal_rule, ("fraction", "ratio")),
                                       ("score_clamp", score_clamp, ("forward", "inplace"))):
            if value not in allowed:
                raise ConfigError(f"model.init_args.{option} must be one of {allowed}, got {value!r}")
        self.m, self.budget, self.mode = m, budget, mode
        self.uniform_n = max(1, round(budget * m)) if uniform_n is None else uniform_n
        self.cost_weight, self.cost_unit, self.anneal_rule = cost_weight, cost_unit, anneal_rule
        self.anneal_factor, self.anneal_interval = anneal_factor, anneal_interval
        self.anneal_threshold = anneal_threshold
        self.rerank_interval, self.rerank_after_freeze = rerank_interval, rerank_after_freeze
        self.score_clamp, self.score_lr, self.fill_budget = score_clamp, score_lr, fill_budget
        self.srste_decay = srste_decay
        self.dense_checkpoint = dense_checkpoint
        self.layer_names = convert_to_nm(self.network, m, score_max)
        self.anneal_c = 1.0
        self._anneal_reference = 1.0
        self._anneal_step = 0
        self._ratio_records: list[float] = []
        self.nm_step = 0  # optimizer steps seen by training_loss: the module's own clock (also outside a Trainer)
        if mode != "search":
            for layer in self.layers().values():
                layer.freeze(self.uniform_n)
                layer.straight_through_dense = mode == "srste"

    def on_setup(self, stage: str) -> None:
        """Starts from ``dense_checkpoint`` when given (a resumed or tested checkpoint then overrides it); the
        magnitude ranks are recomputed from the loaded weights."""
        if self.dense_checkpoint:
            load_network_weights(self.network, self.dense_checkpoint)
            for layer in self.layers().values():
                layer.rerank()

    def layers(self) -> dict[str, NMConv2d]:
        return nm_layers(self.network)

    def pattern(self) -> dict[str, int]:
        """N per N:M layer."""
        return {name: layer.n for name, layer in self.layers().items()}

    def cost_fraction(self) -> float:
        return float(sparse_cost_fraction(self.network, differentiable=False))

    def parameters_to_train(self) -> list[dict[str, Any]]:
        scores = [layer.scores for layer in self.layers().values() if layer.scores.requires_grad]
        score_ids = {id(score) for score in scores}
        weights = [p for p in self.parameters() if p.requires_grad and id(p) not in score_ids]
        groups: list[dict[str, Any]] = [{"params": weights, "name": "weights"}]
        if scores:
            groups.append({"params": scores, "name": SCORE_GROUP, "weight_decay": 0.0})
        return groups

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``score_lr`` for the score group (after the phase's ``lr`` was applied to every group)."""
        if self.score_lr is not None:
            for group in optimizer.param_groups:
                if group.get("name") == SCORE_GROUP:
                    group["lr"] = group["initial_lr"] = self.score_lr

    def on_phase_start(self, name: str, settings: dict[str, Any]) -> bool:
        dense = name == "dense"
        for layer in self.layers().values():
            layer.enabled = not dense
        if name == "search":
            for layer in self.layers().values():
                layer.rerank()
            self._anneal_reference = self.cost_fraction()
            self._anneal_step = self.nm_step
            self._ratio_records = []
        changed = False
        if name == "finetune" and self.mode == "search" and any(
                layer.fixed_n is None for layer in self.layers().values()):
            self.end_search()
            changed = True  # the scores leave the optimizer (phase setting keep_optimizer_state keeps Adam's moments)
        if name in ("finetune", "search") and self.mode == "oneshot":
            for layer in self.layers().values():
                layer.rerank()
        return super().on_phase_start(name, settings) or dense or changed

    def end_search(self) -> dict[str, int]:
        """Freezes every layer's N: warns when the cost is above budget (the search ran out of steps), else
        spends what is left of the budget (``fill_budget``). Returns the frozen pattern."""
        layers = self.layers()
        fraction = self.cost_fraction()
        if fraction > self.budget + 1e-9:
            rank_zero_warn(
                f"[effsr] N:M search ended above budget: the N:M layers cost {fraction:.4f} of their dense MACs, "
                f"budget {self.budget:.4f} (the search phase reached its max_steps before budget_reached). "
                "N is frozen where it is; lengthen the search phase or raise cost_weight / anneal faster.",
                category=UserWarning)
        elif self.fill_budget:
            filled = fill_budget(list(layers.values()), self.budget)
            for index, layer in enumerate(layers.values()):
                layer.freeze(filled[index])
        for layer in layers.values():
            if layer.fixed_n is None:
                layer.freeze()
        return self.pattern()

    def phase_condition(self, name: str) -> bool:
        if name == "budget_reached":
            return self.cost_fraction() <= self.budget + 1e-9
        if name == "dense_ready":
            return self.dense_checkpoint is not None
        return super().phase_condition(name)

    def _searching(self) -> bool:
        return self.mode == "search" and self.phase_name not in ("dense", "finetune") and any(
            layer.fixed_n is None for layer in self.layers().values())

    def training_loss(self, lr: Tensor, hr: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.before_step(self.nm_step)
        self.nm_step += 1
        l1 = F.l1_loss(self.network(lr), hr)
        loss, logs = l1, {"l1": l1.detach()}
        if self._searching():
            if self.cost_unit == "patch_macs":
                cost, _dense = patch_cost(self.network)
            else:
                cost = sparse_cost_fraction(self.network)
            loss = loss + self.cost_weight * self.anneal_c * cost
            logs.update({"nm_cost": cost.detach(), "nm_cost_fraction": torch.tensor(self.cost_fraction()),
                         "nm_c": torch.tensor(self.anneal_c), "nm_budget": torch.tensor(self.budget)})
        if self.mode == "srste" and self.phase_name != "dense":
            decay = sum(((1.0 - layer.mask()) * layer.weight).pow(2).sum() for layer in self.layers().values())
            loss = loss + 0.5 * self.srste_decay * decay
        return loss, logs

    def before_step(self, step: int) -> None:
        """Clamps scores (``score_clamp: inplace``), re-ranks every ``rerank_interval`` steps (after N is frozen
        too with ``rerank_after_freeze``) and anneals c (search only). ``step``: the module's step counter."""
        layers = self.layers().values()
        if self.score_clamp == "inplace":
            for layer in layers:
                layer.clamp_scores()
        rerank = self.mode != "oneshot" and self.rerank_interval > 0 and step % self.rerank_interval == 0
        frozen = self.mode == "search" and not self._searching() and not self.rerank_after_freeze
        if rerank and not frozen and self.phase_name != "dense":
            for layer in layers:
                layer.rerank()
        if self._searching() and step - self._anneal_step >= self.anneal_interval:
            self.anneal(self.cost_fraction())
            self._anneal_step = step

    def anneal(self, cost_fraction: float) -> None:
        """One annealing check at the current hard cost fraction (see ``anneal_rule``)."""
        if self.anneal_rule == "ratio":
            self._ratio_records.append(1.0 / max(cost_fraction, 1e-12))
            if len(self._ratio_records) == 2:
                if self._ratio_records[1] - self._ratio_records[0] < self.anneal_threshold:
                    self.anneal_c *= self.anneal_factor
                self._ratio_records = []
            return
        if self._anneal_reference - cost_fraction < self.anneal_threshold:
            self.anneal_c *= self.anneal_factor
        self._anneal_reference = cost_fraction

    def after_optimizer_step(self) -> None:
        """Logs the N:M cost fraction, budget and annealing factor (every step while searching, else every 50)."""
        if self._searching() or self.global_step % 50 == 0:
            self.log("nm/cost_fraction", self.cost_fraction(), on_step=True, batch_size=1)
            self.log("nm/budget", self.budget, on_step=True, batch_size=1)
            self.log("nm/c", self.anneal_c, on_step=True, batch_size=1)

    def on_eval_end(self, stage: str) -> None:
        """After a validation: N per layer as ``nm_n/<layer>`` and, with W&B, a bar chart ``nm/pattern``."""
        if stage != "val":
            return
        pattern = self.pattern()
        for name, n in pattern.items():
            self.log(f"nm_n/{name}", float(n), on_step=False, on_epoch=True, batch_size=1)
        if self.global_rank == 0:
            log_bar_chart(self.loggers, "nm/pattern", pattern, ("layer", "N"), f"N per layer (M={self.m})",
                          self.global_step)

    def structure_state(self) -> dict[str, Any]:
        return {"m": self.m, "budget": self.budget, "mode": self.mode,  # budget/mode: for readers, not restored
                "fixed_n": {name: layer.fixed_n for name, layer in self.layers().items()},
                "anneal_c": self.anneal_c, "anneal_reference": self._anneal_reference,
                "anneal_step": self._anneal_step, "ratio_records": list(self._ratio_records),
                "nm_step": self.nm_step}

    def rebuild_structure(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("m", self.m) != self.m:
            raise CheckpointError(f"checkpoint was trained with M={state['m']}, config says M={self.m}")
        layers = self.layers()
        for name, fixed in state.get("fixed_n", {}).items():
            if fixed is not None:
                layers[name].freeze(fixed)
        self.anneal_c = float(state.get("anneal_c", 1.0))
        self._anneal_reference = float(state.get("anneal_reference", 1.0))
        self._anneal_step = int(state.get("anneal_step", 0))
        self._ratio_records = [float(value) for value in state.get("ratio_records", [])]
        self.nm_step = int(state.get("nm_step", 0))

    def cost_report(self) -> dict[str, float]:
        layers = self.layers()
        macs, dense_network = nm_macs_720p(self.network, self.scale)
        dense_sparse_layers = sum(int(layer.dense_macs) for layer in layers.values())
        sparse = sum(int(layer.dense_macs) * layer.n // layer.m for layer in layers.values())
        removed = sum(layer.weight.numel() * (layer.m - layer.n) // layer.m for layer in layers.values())
        scores = sum(layer.scores.numel() for layer in layers.values())
        report: dict[str, float] = {
            "macs_720p": float(macs),
            "dense_macs_720p": float(dense_network),
            "params": float(count_params(self.network) - removed - scores),
            "nm_cost_fraction": sparse / max(1, dense_sparse_layers),
            "nm_budget": self.budget,
            "nm_m": float(self.m),
        }
        report.update({f"nm_n.{name}": float(layer.n) for name, layer in layers.items()})
        return report

    def export(self) -> nn.Module:
        """The deployable network: plain convs with the masked weights."""
        return export_masked(self.network)

