"""ClassSR's effsr-only training options: a ``branches`` phase with ``all_classes: true`` (a branch pretrained on
every sub-image before its class)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effsr.errors import ConfigError
from effsr.methods.classsr import ClassSRModule, ClassSRNet


class _Subsets:
    """Records what the module asks the data module to draw from (TrainSubsetSettable)."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray | None] = []

    def set_train_subset(self, indices: np.ndarray | None) -> None:
        self.calls.append(indices)


def _module() -> tuple[ClassSRModule, _Subsets]:
    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.FSRCNN", widths=[4, 6, 8], scale=4,
                         backbone_args={"shrink_features": 4, "num_mapping": 1})
    module = ClassSRModule(network=network, export_backbones=False)
    subsets = _Subsets()
    module._trainer = SimpleNamespace(datamodule=subsets)  # only what the phase hooks read
    return module, subsets


@pytest.mark.unit
def test_all_classes_phase_trains_the_branch_on_every_subimage() -> None:
    module, subsets = _module()
    module.split_labels = torch.tensor([2, 2, 1, 0, 2, 2], dtype=torch.uint8)
    batch = {"index": torch.tensor([0, 1, 4, 5])}  # all of class 2
    lr, hr = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 32, 32)

    module.enter_phase("branches_pre", {"branch": [0, 1], "all_classes": True})
    assert [any(p.requires_grad for p in b.parameters()) for b in module.network.branches] == [True, True, False]
    assert subsets.calls[-1] is None  # the sampler draws from every sub-image
    loss, _ = module.training_loss(lr, hr, batch)
    branches = module.network.branches
    expected = (F.l1_loss(branches[0](lr), hr) + F.l1_loss(branches[1](lr), hr)) / 2
    assert torch.allclose(loss, expected)

    module.enter_phase("branches_0", {"branch": 0})  # the class phase after it: class 0 only
    assert subsets.calls[-1].tolist() == [3]
    loss, _ = module.training_loss(lr, hr, batch)
    assert float(loss.detach()) == 0.0  # no sample of class 0 in this batch


@pytest.mark.unit
def test_all_classes_phase_may_run_before_the_split() -> None:
    module, subsets = _module()
    module.enter_phase("branches_pre", {"branch": 0, "all_classes": True})
    assert subsets.calls[-1] is None
    with pytest.raises(ConfigError, match="put a `split` phase before it"):
        module.enter_phase("branches_0", {"branch": 0})
