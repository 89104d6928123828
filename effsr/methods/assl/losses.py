"""ASSL's training terms: sparsity-structure alignment and the growing L2 coefficient."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from effsr.errors import ConfigError

SSAThreshold = Literal["kept", "detached"]


def ssa_loss(gammas: Sequence[Tensor], num_pruned: int, threshold: SSAThreshold = "kept") -> Tensor:
    """Sparsity-structure alignment: −mean(S·Sᵀ) with S_l = sigmoid(x_l − t_l) stacked over layers.

    ``threshold="kept"`` (official ASSL code): x_l = γ_l (signed) and t_l = the γ of layer l's smallest kept
    filter (sorted position ``num_pruned``), not detached, so t_l's gradient lands on that boundary filter.
    ``"detached"`` (effsr's earlier form): x_l = |γ_l| and t_l = its ``num_pruned``-th smallest |γ|, detached.
    Minimising the loss pushes the layers' soft keep-masks to agree on which channels survive.
    """
    if threshold not in ("kept", "detached"):
        raise ConfigError(f"ASSL ssa_threshold must be 'kept' or 'detached', got {threshold!r}")
    masks = []
    for gamma in gammas:
        if threshold == "kept":
            boundary = torch.argsort(gamma.detach(), stable=True)[num_pruned]
            masks.append(torch.sigmoid(gamma - gamma[boundary]))
            continue
        magnitude = gamma.abs()
        cut = magnitude.detach().kthvalue(num_pruned).values if num_pruned > 0 else magnitude.detach().min()
        masks.append(torch.sigmoid(magnitude - cut))
    stacked = torch.stack(masks)
    return -(stacked @ stacked.t()).mean()


@dataclass
class GrowingL2:
    """ASSL's growing L2 coefficient: +``step`` every ``interval`` steps from a layer's start, up to ``limit``.

    α(s) = min(limit, step · ⌊(s − start + 1) / interval⌋) for optimizer step s (0-based, so the
    ``interval``-th step of a layer already applies ``step``); after :meth:`freeze` at step f it stays α(f).
    """

    interval: int = 20
    step: float = 1e-4
    limit: float = 0.5
    starts: dict[str, int] = field(default_factory=dict)
    frozen_at: int | None = None

    def start(self, key: str, global_step: int) -> None:
        self.starts.setdefault(key, global_step)

    def freeze(self, global_step: int) -> None:
        if self.frozen_at is None:
            self.frozen_at = global_step

    def alpha(self, key: str, global_step: int) -> float:
        if key not in self.starts:
            return 0.0
        step = global_step if self.frozen_at is None else min(global_step, self.frozen_at)
        increments = max(0, step - self.starts[key] + 1) // max(1, self.interval)
        return min(self.limit, self.step * increments)

    def reached(self, keys: Iterable[str], global_step: int) -> bool:
        keys = list(keys)
        return bool(keys) and all(self.alpha(key, global_step) >= self.limit - 1e-12 for key in keys)

    def state(self) -> dict[str, Any]:
        return {"starts": dict(self.starts), "frozen_at": self.frozen_at}

    def load(self, state: dict[str, Any]) -> None:
        self.starts = {str(key): int(value) for key, value in (state.get("starts") or {}).items()}
        self.frozen_at = state.get("frozen_at")

