"""`effsr profile`'s core: counts against hand-computed numbers, measured latency/memory, JSON and table output."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from effsr.archs import EDSR, FSRCNN
from effsr.profile import format_profile_table, profile_network

pytestmark = pytest.mark.unit


def test_edsr_baseline_profile() -> None:
    network = EDSR(4)
    report = profile_network(network, 4, lr_size=(12, 16), runs=2, warmup=0)
    # Params: head 1,792 + 16·2·36,928 + body 36,928 + 2·147,712 (upsampler) + tail 1,731 = 1,517,571 ("1.52 M").
    assert report["params"] == 1_517_571
    # MACs at 1280×720 (derivation in test_cost.py): 57,600 LR px × 1,365,696 + 230,400 × 147,456 + 921,600 × 1,728.
    assert report["macs_720p"] == 114_230_476_800
    # The profiled 16×12 input: 192 LR px, 768 px after the first shuffle, 3,072 HR px.
    assert report["macs_at_lr_size"] == 192 * 1_365_696 + 768 * 147_456 + 3_072 * 1_728
    assert report["lr_size"] == [12, 16] and report["hr_size"] == [48, 64]
    assert report["runs"] == 2 and report["torch_threads"] == torch.get_num_threads()
    assert report["device"].startswith("cpu")
    assert 0 < report["latency_ms_min"] <= report["latency_ms_median"]
    if "clear_refs" in report["memory_method"]:
        # The second upsampler conv's output alone is 256 × 24 × 32 float32 = 0.75 MiB, alive during the forward.
        assert report["peak_memory_mib"] >= 256 * 24 * 32 * 4 / 2**20
    assert json.loads(json.dumps(report)) == report
    table = format_profile_table(report)
    assert "1.52 M" in table and "114.23 GMACs" in table and "median of 2 runs" in table


def test_fsrcnn_profile_counts_the_transposed_conv() -> None:
    network = FSRCNN(4)
    network.train()
    report = profile_network(network, 4, lr_size=(12, 16), runs=2, warmup=0)
    assert network.training
    # LR layers 10,728 MACs per LR pixel; 9×9 deconv 56→3 = 13,608 per HR pixel (test_cost.py derivation).
    assert report["params"] == 24_683
    assert report["macs_720p"] == 10_728 * 57_600 + 13_608 * 921_600
    assert report["macs_per_lr_patch_32"] == 10_728 * 32**2 + 13_608 * 128**2
    assert report["flops_classsr"] == 2 * report["macs_per_lr_patch_32"]
    assert report["macs_at_lr_size"] == 10_728 * 12 * 16 + 13_608 * 48 * 64
    assert "ClassSR FLOPs" in format_profile_table(report)


class DataDependentSparseNet(nn.Module):
    """A ×2 toy network whose conv reports MACs only at positions where the input is non-zero."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 2
        self.pixel_range = 1.0
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.last_active = 0

    def forward(self, x: Tensor) -> Tensor:
        active = x.abs().sum(1) > 0
        self.last_active = int(active.sum().item())  # needs data: fails on the meta device
        return self.shuffle(self.conv(x) * active.unsqueeze(1))

    def reported_macs(self) -> int:
        return 27 * 12 * self.last_active


def test_data_dependent_networks_are_counted_on_the_real_device() -> None:
    report = profile_network(DataDependentSparseNet(), 2, lr_size=(8, 8), runs=1, warmup=0)
    # Cost is counted on zero images: no active position, so the hook reports 0 MACs.
    assert report["macs_720p"] == 0 and report["macs_per_lr_patch_32"] == 0
    assert report["params"] == 27 * 12 + 12


def test_invalid_run_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="runs"):
        profile_network(FSRCNN(2), 2, lr_size=(8, 8), runs=0)
