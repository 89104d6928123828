"""Routing replay for the routing studies (``nm_adaptive.py``, ``classsr_routing.py``): run each network once on
every routing tile of an image (:class:`Recorder`), then stitch any per-tile choice from those outputs
(:class:`Replay` + :class:`SequencePolicy` through :func:`effsr.inference.tiling.routed_forward`), which gives
exactly what running the chosen networks would, without running them again."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Recorder", "Replay", "SequencePolicy", "constant_policy"]


class SequencePolicy:
    """Returns precomputed choices in the order routed_forward asks for them."""

    def __init__(self, choices: Tensor) -> None:
        self.choices, self.cursor = choices, 0

    def __call__(self, patches: Tensor) -> Tensor:
        chosen = self.choices[self.cursor:self.cursor + patches.shape[0]]
        self.cursor += patches.shape[0]
        return chosen


class Recorder:
    """A network as routed_forward calls it, keeping the tiles it got and what it returned (in call order)."""

    def __init__(self, network: nn.Module | Callable[[Tensor], Tensor]) -> None:
        self.network, self.tiles, self.outputs = network, [], []

    def __call__(self, patches: Tensor) -> Tensor:
        output = self.network(patches)
        self.tiles.append(patches)
        self.outputs.append(output)
        return output


class Replay:
    """Network ``index`` replayed from its recorded outputs of every tile: returns those of the tiles ``choices``
    routes to it, in the order routed_forward asks for them (ascending tile index, in batches)."""

    def __init__(self, outputs: Tensor, choices: Tensor, index: int) -> None:
        self.outputs, self.order, self.cursor = outputs, torch.nonzero(choices == index).flatten(), 0

    def __call__(self, patches: Tensor) -> Tensor:
        chosen = self.order[self.cursor:self.cursor + patches.shape[0]]
        self.cursor += patches.shape[0]
        return self.outputs[chosen]


def constant_policy(index: int) -> Callable[[Tensor], Tensor]:
    """Every tile to network ``index``."""
    return lambda patches: torch.full((patches.shape[0],), index, dtype=torch.long)
