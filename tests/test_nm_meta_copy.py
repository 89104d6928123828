"""``meta_copy`` (the shapes-only copy behind sparsifiable_convs, dense_layer_macs and nm_macs_720p) and
``NMConv2d.from_conv``'s single ranking: the original is untouched, the copy and the ranks are what they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effsr.methods.nm_sparsity.convert import meta_copy
from effsr.methods.nm_sparsity.layer import NMConv2d, magnitude_ranks

pytestmark = pytest.mark.unit


def test_meta_copy_keeps_structure_and_leaves_the_original_alone() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, bias=False))
    network[2].weight.requires_grad_(False)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    copy = meta_copy(network)
    assert all(tensor.device.type == "meta" for tensor in (*copy.parameters(), *copy.buffers()))
    assert {k: v.shape for k, v in copy.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert [p.requires_grad for p in copy.parameters()] == [True, True, True, True, False]
    assert all(isinstance(p, nn.Parameter) for p in copy.parameters())
    assert all(torch.equal(network.state_dict()[key], value) for key, value in before.items())
    assert copy(torch.zeros(1, 3, 5, 5, device="meta")).shape == (1, 8, 5, 5)


def test_from_conv_ranks_the_copied_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    layer = NMConv2d.from_conv(conv, m=4)
    assert torch.equal(layer.rank, magnitude_ranks(conv.weight, 4))
    fresh = NMConv2d(8, 4, 3, m=4)  # built directly: ranks its own init
    assert torch.equal(fresh.rank, magnitude_ranks(fresh.weight, 4))
