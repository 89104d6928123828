"""ASSL's training terms: sparsity-structure alignment and the growing L2 coefficient."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def ssa_loss(gammas: Sequence[Tensor], num_pruned: int) -> Tensor:
    """Sparsity-structure alignment: −mean(S·Sᵀ) with S_l = sigmoid(|γ_l| − t_l) stacked over layers.

    ``t_l`` is layer l's pruning threshold: its ``num_pruned``-th smallest |γ| (detached). Minimising the
    loss pushes the layers' soft keep-masks to agree on which channels survive.
    """
    masks = []
    for gamma in gammas:
        magnitude = gamma.abs()
        threshold = magnitude.detach().kthvalue(num_pruned).values if num_pruned > 0 else magnitude.detach().min()
        masks.append(torch.sigmoid(magnitude - threshold))
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

