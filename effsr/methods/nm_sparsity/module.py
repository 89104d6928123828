"""N:M fine-grained structured sparsity with learned layer-wise N (SLS, CVPR 2022) and adaptive patch inference.

Every convolution of a backbone except the first and the last becomes an :class:`NMConv2d`: along the input
channels, each group of M consecutive weights (per output channel and kernel position) keeps its N largest
weights. The rank of every weight inside its group is stored once as a ``uint8`` buffer (the official code keeps
M masked copies of the weight, which makes checkpoints ~M× larger) and recomputed every ``rerank_interval``
steps. N is learned per layer: M−1 priority scores k (init 1, clamped to [0, ``score_max``]), keep probability
p_j = Π_{i≤j} k_i of unit j (the j-th largest weight of every group), hard keep b_j = 1[p_j > 0.5] with the
straight-through estimator b − p.detach() + p; unit 0 is always kept so N = 1 + Σ b_j.

The search phase adds λ·c·(sparse cost / dense cost of the sparse layers) to the L1 loss, with c ×``anneal_factor``
whenever the cost fraction dropped by less than ``anneal_threshold`` over the last ``anneal_interval`` steps.
``phase_condition("budget_reached")`` ends the search; ``finetune`` freezes N and the pattern.

Adaptive inference: :class:`MSEEstimator` predicts, from an LR patch, the MSE a given network will make on
it; :class:`NMEnsemble` routes every patch through the shared :func:`effsr.inference.tiling.routed_forward`
to argmin_k est_MSE_k + λ·cost_k; :class:`AdaptiveNMModule` trains the estimators and evaluates the ensemble.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from effsr.cost import MacCounter, count_macs, count_params, lr_size_for_720p, macs_at_720p
from effsr.errors import CheckpointError, ConfigError
from effsr.inference.tiling import routed_forward
from effsr.models.base import SRModule, _default_optimizer

Mode = Literal["search", "oneshot", "uniform", "srste"]
CostUnit = Literal["fraction", "patch_macs"]
AnnealRule = Literal["fraction", "ratio"]
ScoreClamp = Literal["forward", "inplace"]
SCORE_GROUP = "nm_scores"


# ---------------------------------------------------------------------------------------------- N:M layer
def group_view(weight: Tensor, m: int) -> Tensor:
    """(C_out, C_in, kh, kw) → (C_out, C_in/M, kh, kw, M): groups of M consecutive input channels last."""
    c_out, c_in, kh, kw = weight.shape
    return weight.reshape(c_out, c_in // m, m, kh, kw).permute(0, 1, 3, 4, 2)


def ungroup_view(grouped: Tensor) -> Tensor:
    """Inverse of :func:`group_view`."""
    c_out, groups, kh, kw, m = grouped.shape
    return grouped.permute(0, 1, 4, 2, 3).reshape(c_out, groups * m, kh, kw)


def magnitude_ranks(weight: Tensor, m: int) -> Tensor:
    """Rank (0 = largest |w|) of every weight inside its group of M input channels, as uint8, weight's shape."""
    order = group_view(weight.detach().abs(), m).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=weight.device).expand_as(order).contiguous())
    return ungroup_view(ranks).to(torch.uint8)


class NMConv2d(nn.Conv2d):
    """A conv whose weight keeps N of every M consecutive input-channel weights, N learned (or fixed).

    State: ``weight``/``bias`` (dense values), ``rank`` (uint8 rank per weight), ``scores`` (M−1 priorities),
    ``dense_macs`` (MACs of the dense layer for a 1280×720 output, measured once). ``fixed_n`` is set when the
    pattern is frozen (finetune, one-shot, SR-STE); ``enabled=False`` makes the layer dense (dense pretraining).
    """

    def __init__(self, *args: Any, m: int = 8, score_max: float = 1.03, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        in_per_group = self.in_channels // self.groups
        if in_per_group % m:
            raise ConfigError(f"N:M with M={m} needs input channels per group divisible by M, got {in_per_group}")
        self.m = m
        self.score_max = score_max
        self.scores = nn.Parameter(torch.ones(m - 1))
        self.register_buffer("rank", magnitude_ranks(self.weight, m))
        self.register_buffer("dense_macs", torch.zeros((), dtype=torch.int64))
        self.fixed_n: int | None = None
        self.straight_through_dense = False
        self.enabled = True
        self._last_macs = 0
        self._last_n = m
        self._last_image_macs = 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, m: int, score_max: float = 1.03) -> NMConv2d:
        """An N:M layer with the conv's hyper-parameters and weights (N = M until scores drop)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, m=m, score_max=score_max,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.rerank()
        return layer

    @torch.no_grad()
    def rerank(self) -> None:
        """Recomputes the magnitude rank of every weight in its group."""
        self.rank.copy_(magnitude_ranks(self.weight, self.m))

    @torch.no_grad()
    def clamp_scores(self) -> None:
        self.scores.clamp_(0.0, self.score_max)

    def keep_probabilities(self) -> Tensor:
        """p_j for units 1..M−1: cumulative products of the clamped scores."""
        return torch.cumprod(self.scores.clamp(0.0, self.score_max), dim=0)

    def unit_keep(self) -> Tensor:
        """(M,) keep value per unit; STE (b − p.detach() + p) while searching, exact 0/1 once frozen."""
        if self.fixed_n is not None:
            return (torch.arange(self.m, device=self.scores.device) < self.fixed_n).to(self.weight.dtype)
        probabilities = self.keep_probabilities()
        hard = (probabilities > 0.5).to(probabilities.dtype)
        ste = hard - probabilities.detach() + probabilities
        return torch.cat([torch.ones(1, device=ste.device, dtype=ste.dtype), ste])

    def soft_n(self) -> Tensor:
        """N as a differentiable scalar (value = the integer N)."""
        return self.unit_keep().sum()

    @property
    def n(self) -> int:
        """Current N (kept weights per group of M)."""
        if self.fixed_n is not None:
            return self.fixed_n
        if self.scores.device.type == "meta":
            return self._last_n
        return 1 + int((self.keep_probabilities() > 0.5).sum())

    def mask(self) -> Tensor:
        """Weight-shaped mask: unit_keep gathered at each weight's rank (gradients reach the scores)."""
        return self.unit_keep()[self.rank.long()]

    def sparse_weight(self) -> Tensor:
        """The weight the layer applies (masked); SR-STE passes dense gradients to pruned weights."""
        if not self.enabled:
            return self.weight
        mask = self.mask()
        if self.straight_through_dense:
            return self.weight * mask + (self.weight - self.weight.detach()) * (1.0 - mask)
        return self.weight * mask

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "meta":
            self._last_n = self.n
        output = self._conv_forward(x, self.sparse_weight(), self.bias)
        per_output = self.kernel_size[0] * self.kernel_size[1] * (self.in_channels // self.groups)
        dense = per_output * output.numel()
        self._last_macs = dense * (self._last_n if self.enabled else self.m) // self.m
        self._last_image_macs = per_output * output[0].numel() if output.dim() == 4 else dense
        return output

    def image_macs(self) -> int:
        """Dense MACs of this layer for ONE image of the last forward (the official cost unit: per training
        patch, ``op_per_position · h_out · w_out``)."""
        return self._last_image_macs

    def reported_macs(self) -> int:
        """MACs the N:M execution of the last forward performs (effsr.cost hook): N/M of the dense conv."""
        return self._last_macs

    def freeze(self, n: int | None = None) -> None:
        """Fixes N (default: the current learned N) and the pattern; scores stop training."""
        self.fixed_n = int(self.n if n is None else n)
        self._last_n = self.fixed_n
        self.scores.requires_grad_(False)

    def to_dense_conv(self) -> nn.Conv2d:
        """A plain conv holding the masked weights (the exported layer)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self.sparse_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


# ---------------------------------------------------------------------------------------------- conversion
def _is_mean_shift(module: nn.Module) -> bool:
    return type(module).__name__ == "MeanShift"


def sparsifiable_convs(network: nn.Module, m: int) -> list[str]:
    """Names of the convs that become N:M: every conv in forward order except the first and the last
    (and except mean shifts and convs whose input channels per group are not a multiple of M)."""
    order: list[str] = []
    meta = copy.deepcopy(network).to("meta")
    names = {module: name for name, module in meta.named_modules()}
    handles = [module.register_forward_pre_hook(lambda mod, _args: order.append(names[mod]))
               for module in meta.modules() if isinstance(module, nn.Conv2d) and not _is_mean_shift(module)]
    try:
        with torch.no_grad():
            meta(torch.zeros(1, 3, 16, 16, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    unique = list(dict.fromkeys(order))
    inner = unique[1:-1]
    modules = dict(network.named_modules())
    return [name for name in inner if (modules[name].in_channels // modules[name].groups) % m == 0]


def dense_layer_macs(network: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Dense MACs of each named conv for a 1280×720 HR output (effsr.cost on a meta copy, shapes only)."""
    meta = copy.deepcopy(network).to("meta")
    modules = dict(meta.named_modules())
    inputs: dict[str, torch.Size] = {}

    def recorder(key: str) -> Any:
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs.setdefault(key, args[0].shape)
        return record

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in names]
    try:
        height, width = lr_size_for_720p(int(network.scale))
        with torch.no_grad():
            meta(torch.zeros(1, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    result: dict[str, int] = {}
    for name in names:
        plain = modules[name]
        conv = nn.Conv2d(plain.in_channels, plain.out_channels, plain.kernel_size, stride=plain.stride,
                         padding=plain.padding, dilation=plain.dilation, groups=plain.groups, device="meta")
        result[name] = count_macs(conv, torch.zeros(inputs[name], device="meta"))
    return result


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert_to_nm(network: nn.Module, m: int, score_max: float = 1.03) -> list[str]:
    """Replaces the sparsifiable convs of ``network`` in place by :class:`NMConv2d`; returns their names."""
    names = sparsifiable_convs(network, m)
    if not names:
        raise ConfigError(f"{type(network).__name__} has no conv (besides the first/last) with input channels "
                          f"divisible by M={m}")
    macs = dense_layer_macs(network, names)
    for name in names:
        layer = NMConv2d.from_conv(network.get_submodule(name), m, score_max)
        layer.dense_macs.fill_(macs[name])
        _set_submodule(network, name, layer)
    return names


def nm_layers(network: nn.Module) -> dict[str, NMConv2d]:
    return {name: module for name, module in network.named_modules() if isinstance(module, NMConv2d)}


def sparse_cost_fraction(network: nn.Module, differentiable: bool = True) -> Tensor:
    """Σ (N/M)·dense MACs / Σ dense MACs over the N:M layers (differentiable through the STE)."""
    layers = list(nm_layers(network).values())
    dense = sum(float(layer.dense_macs) for layer in layers)
    if differentiable:
        total = sum(layer.soft_n() / layer.m * float(layer.dense_macs) for layer in layers)
        return total / dense
    return torch.tensor(sum(layer.n / layer.m * float(layer.dense_macs) for layer in layers) / dense)


def patch_cost(network: nn.Module) -> tuple[Tensor, int]:
    """(Σ (N/M)·dense MACs per image of the last forward, differentiable; Σ dense MACs per image): the
    official SLS cost, in MACs of one training patch (``compute_costs`` of the official code)."""
    layers = list(nm_layers(network).values())
    dense = sum(layer.image_macs() for layer in layers)
    return sum(layer.soft_n() / layer.m * float(layer.image_macs()) for layer in layers), dense


def fill_budget(layers: Sequence[NMConv2d], budget: float) -> dict[int, int]:
    """Raises N, one unit at a time, while the N:M layers' cost stays ≤ ``budget`` of their dense MACs.

    The unit added next is the one with the lowest cost per keep probability: for layer l at N_l its next unit
    costs dense_l/M and ranks p_{l,N_l} (the cumulative score product, unit N_l); ties go to the earlier layer.
    Returns {layer index: N}. Without it a search that stops below budget (one unit of a big layer can be a few
    % of the cost) leaves "equal MACs" comparisons off by that much.
    """
    ns = [layer.n for layer in layers]
    dense = [float(layer.dense_macs) for layer in layers]
    target = budget * sum(dense)
    cost = sum(n / layer.m * d for n, layer, d in zip(ns, layers, dense, strict=True))
    with torch.no_grad():
        probabilities = [layer.keep_probabilities().tolist() for layer in layers]
    while True:
        best, best_key = -1, math.inf
        for index, layer in enumerate(layers):
            step = dense[index] / layer.m
            if ns[index] >= layer.m or cost + step > target * (1 + 1e-12):
                continue
            key = step / max(probabilities[index][ns[index] - 1], 1e-12)
            if key < best_key:
                best, best_key = index, key
        if best < 0:
            return dict(enumerate(ns))
        cost += dense[best] / layers[best].m
        ns[best] += 1


def export_masked(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every N:M layer replaced by a plain conv holding the masked weights."""
    exported = copy.deepcopy(network)
    for name, layer in nm_layers(exported).items():
        _set_submodule(exported, name, layer.to_dense_conv())
    return exported


def to_semi_structured_2to4(network: nn.Module) -> nn.Module:
    """EXPERIMENTAL: 2:4 layers → torch semi-structured sparse weights (CUDA only; 1×1 convs as linear maps).

    Stock 2:4 kernels rarely speed up SR-sized convs; this is for experiments. Raises on CPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured sparsity needs a CUDA GPU with sparse tensor cores (sm80+); "
                           "use export_masked() on CPU")
    from torch.sparse import to_sparse_semi_structured

    exported = export_masked(network).cuda().half()
    for name, layer in nm_layers(network).items():
        if layer.m != 4 or layer.n != 2 or layer.kernel_size != (1, 1):
            continue
        conv = exported.get_submodule(name)
        conv.weight = nn.Parameter(to_sparse_semi_structured(conv.weight.detach().flatten(1)), requires_grad=False)
    return exported


# ---------------------------------------------------------------------------------------------- module
def load_network_weights(network: nn.Module, path: str) -> None:
    """Loads a dense checkpoint (Lightning ``state_dict`` with ``network.`` keys, or a plain state_dict)."""
    if not Path(path).is_file():
        raise CheckpointError(f"dense checkpoint {path} not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith("network.") for key in state):
        state = {key[len("network."):]: value for key, value in state.items() if key.startswith("network.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if not key.endswith(("scores", "rank", "dense_macs"))]:
        raise CheckpointError(f"{path} does not match {type(network).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


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
        if dense_checkpoint:
            load_network_weights(network, dense_checkpoint)
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

    def layers(self) -> dict[str, NMConv2d]:
        return nm_layers(self.network)

    def pattern(self) -> dict[str, int]:
        """N per N:M layer."""
        return {name: layer.n for name, layer in self.layers().items()}

    def cost_fraction(self) -> float:
        return float(sparse_cost_fraction(self.network, differentiable=False))

    # -------------------------------------------------------------- hooks
    def parameters_to_train(self) -> list[dict[str, Any]]:
        scores = [layer.scores for layer in self.layers().values() if layer.scores.requires_grad]
        score_ids = {id(score) for score in scores}
        weights = [p for p in self.parameters() if p.requires_grad and id(p) not in score_ids]
        groups: list[dict[str, Any]] = [{"params": weights, "name": "weights"}]
        if scores:
            groups.append({"params": scores, "name": SCORE_GROUP, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        configured = super().configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        if self.score_lr is not None:
            for group in optimizer.param_groups:
                if group.get("name") == SCORE_GROUP:
                    group["lr"] = group["initial_lr"] = self.score_lr
        return configured

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

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._searching() or self.global_step % 50 == 0:
            self.log("nm/cost_fraction", self.cost_fraction(), on_step=True, batch_size=1)
            self.log("nm/budget", self.budget, on_step=True, batch_size=1)
            self.log("nm/c", self.anneal_c, on_step=True, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        for name, n in self.pattern().items():
            self.log(f"nm_n/{name}", float(n), on_step=False, on_epoch=True, batch_size=1)
        self._log_pattern_chart()

    def _log_pattern_chart(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(self.logger, WandbLogger) or self.global_rank != 0:
            return
        import wandb

        table = wandb.Table(data=[[name, n] for name, n in self.pattern().items()], columns=["layer", "N"])
        chart = wandb.plot.bar(table, "layer", "N", title=f"N per layer (M={self.m})")
        self.logger.experiment.log({"nm/pattern": chart, "trainer/global_step": self.global_step})

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
        dense_copy = copy.deepcopy(self.network).to("meta")
        for layer in nm_layers(dense_copy).values():
            layer.enabled = False
        dense_network = macs_at_720p(dense_copy, self.scale, device="meta")
        dense_sparse_layers = sum(int(layer.dense_macs) for layer in layers.values())
        sparse = sum(int(layer.dense_macs) * layer.n // layer.m for layer in layers.values())
        removed = sum(layer.weight.numel() * (layer.m - layer.n) // layer.m for layer in layers.values())
        scores = sum(layer.scores.numel() for layer in layers.values())
        report: dict[str, float] = {
            "macs_720p": float(dense_network - dense_sparse_layers + sparse),
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


# ---------------------------------------------------------------------------------------------- adaptive
def patch_mse(sr: Tensor, hr: Tensor, pixel_range: float = 1.0, y_channel: bool = True) -> Tensor:
    """(P,) MSE per patch in [0, 1] units: of the BT.601 luma Y/255 (what PSNR-Y measures) or of RGB."""
    difference = (sr - hr) / pixel_range
    if y_channel:
        weights = torch.tensor([65.481, 128.553, 24.966], device=sr.device, dtype=sr.dtype) / 255.0
        difference = (difference * weights.view(1, 3, 1, 1)).sum(dim=1)
    return difference.pow(2).flatten(1).mean(dim=1)


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (how well estimates order patches)."""
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    ranks = [rank - rank.mean() for rank in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()).clamp_min(1e-12))


class MSEEstimator(nn.Module):
    """Light CNN mapping an LR patch (input in [0, pixel_range]) to one log-MSE number.

    The patch is made zero-mean per channel (MSE does not depend on brightness, it does on contrast) and scaled
    to unit range; strided conv + LeakyReLU layers; pooling keeps the mean and the log mean energy of every
    feature map, plus the log mean squared gradient of the patch (SR error grows with high-frequency energy; this
    hand-made feature alone ranks held-out patches well); a two-layer head; ``shift`` (a buffer set from the
    first training targets) centres the output so training starts near the right magnitude.
    """

    def __init__(self, pixel_range: float = 1.0, num_features: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.pixel_range = pixel_range
        layers: list[nn.Module] = []
        channels = 3
        for index in range(num_layers):
            kernel = 4 if index == 0 else 3
            layers += [nn.Conv2d(channels, num_features, kernel, stride=2, padding=1), nn.LeakyReLU(0.1)]
            channels = num_features
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * num_features + 1, num_features), nn.LeakyReLU(0.1),
                                  nn.Linear(num_features, 1))
        self.register_buffer("shift", torch.zeros(()))

    def forward(self, lr: Tensor) -> Tensor:
        """(P, 3, h, w) → (P,) prediction (log MSE, or log MSE ratio; see :class:`NMEnsemble`)."""
        x = (lr - lr.mean(dim=(2, 3), keepdim=True)) * (4.0 / self.pixel_range)
        features = self.features(x)
        gray = x.mean(dim=1)
        gradient = gray.diff(dim=1).pow(2).mean(dim=(1, 2)) + gray.diff(dim=2).pow(2).mean(dim=(1, 2))
        pooled = torch.cat([features.mean(dim=(2, 3)), features.pow(2).mean(dim=(2, 3)).add(1e-4).log(),
                            gradient.add(1e-6).log()[:, None]], dim=1)
        return self.head(pooled).squeeze(-1) + self.shift


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


def load_nm_member(backbone: nn.Module, path: str | None, m: int) -> tuple[nn.Module, float]:
    """A copy of ``backbone`` loaded from an N:M (or dense, ``path=None`` = as given) checkpoint, with its cost
    as a fraction of the dense network's MACs at 720p."""
    network = copy.deepcopy(backbone)
    dense = macs_at_720p(copy.deepcopy(network).to("meta"), device="meta")
    if path is None:
        return network, 1.0
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {key[len("network."):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith("network.")}
    if any(key.endswith(".rank") for key in state):
        convert_to_nm(network, m)
        structure = checkpoint.get("effsr", {}).get("structure", {})
        layers = nm_layers(network)
        for name, fixed in structure.get("fixed_n", {}).items():
            if fixed is not None:
                layers[name].freeze(fixed)
        network.load_state_dict(state)
        for layer in layers.values():
            if layer.fixed_n is None:
                layer.freeze()
        dense_layers = sum(int(layer.dense_macs) for layer in layers.values())
        sparse = sum(int(layer.dense_macs) * layer.n // layer.m for layer in layers.values())
        return network, (dense - dense_layers + sparse) / dense
    network.load_state_dict(state)
    return network, 1.0


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
        loaded = [load_nm_member(network, path, m) for path in checkpoints]
        ensemble = NMEnsemble([member for member, _ in loaded], [cost for _, cost in loaded], estimator_features,
                              penalty, target_cost, patch_size, overlap, relative, y_channel)
        super().__init__(ensemble, optimizer, lr_scheduler, **kwargs)
        for parameter in ensemble.members.parameters():
            parameter.requires_grad_(False)
        self._measured: dict[str, float] = {}
        self.register_buffer("estimators_initialised", torch.zeros((), dtype=torch.bool))

    @property
    def ensemble(self) -> NMEnsemble:
        return self.network

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

