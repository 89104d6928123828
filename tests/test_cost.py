"""Cost counting: hand-computed MACs, the conventions for grouped/transposed convs, and the sparse-layer hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effsr.archs import CARN, CARNM, EDSR, FSRCNN, MSRResNet
from effsr.cost import (
    CostReport,
    MacCounter,
    count_macs,
    count_params,
    lr_size_for_720p,
    macs_at_720p,
    macs_per_lr_patch,
)

pytestmark = pytest.mark.unit


def meta(cls: type[nn.Module], scale: int, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return cls(scale, **kwargs)


def test_lr_sizes_of_the_720p_convention() -> None:
    assert lr_size_for_720p(2) == (360, 640)
    assert lr_size_for_720p(3) == (240, 426)
    assert lr_size_for_720p(4) == (180, 320)
    with pytest.raises(ValueError):
        lr_size_for_720p(0)


def test_edsr_baseline_x4_macs_at_720p_by_hand() -> None:
    # LR 320×180 = 57,600 px. Per LR pixel: head 9·3·64 = 1,728; 16 blocks × 2 convs × 9·64·64 = 1,179,648;
    # body conv 36,864; first upsampler conv 9·64·256 = 147,456. The second upsampler conv runs at 640×360
    # (230,400 px), 147,456 each; the tail conv 9·64·3 = 1,728 at 1280×720 (921,600 px).
    expected = 57_600 * (1_728 + 1_179_648 + 36_864 + 147_456) + 230_400 * 147_456 + 921_600 * 1_728
    assert expected == 114_230_476_800
    assert macs_at_720p(meta(EDSR, 4)) == expected
    # SLS (CVPR 2022) lists EDSR-baseline ×4 as 114.49 GMACs at 1280×720: within 0.3 %.
    assert expected == pytest.approx(114.49e9, rel=0.003)


def test_fsrcnn_x4_macs_with_the_transposed_conv_at_output_resolution() -> None:
    # LR layers per LR pixel: 25·3·56 = 4,200 (extract) + 56·12 = 672 (shrink) + 4·9·12·12 = 5,184 (mapping)
    # + 12·56 = 672 (expand) = 10,728. Deconv 9×9, 56→3, counted at the HR resolution: 81·56·3 = 13,608 per
    # HR pixel (docs/protocol.md); the arithmetic actually performed is 13,608 per LR pixel.
    lr_pixels, hr_pixels = 320 * 180, 1280 * 720
    network = FSRCNN(4)
    assert macs_at_720p(network) == 10_728 * lr_pixels + 13_608 * hr_pixels == 13_159_065_600
    assert macs_at_720p(network, transposed_conv_at_output=False) == (10_728 + 13_608) * lr_pixels
    # ClassSR reports FSRCNN-O as 468 M "FLOPs" (= 2 × MACs) per 32×32 LR patch (128×128 output):
    # 2 · (10,728 · 32² + 13,608 · 128²) = 467,877,888 — the output-resolution convention reproduces it.
    per_patch = macs_per_lr_patch(network, 4)
    assert per_patch == 10_728 * 32**2 + 13_608 * 128**2
    assert 2 * per_patch == pytest.approx(468e6, rel=0.001)


def test_classsr_and_sls_published_costs() -> None:
    # ClassSR (CVPR 2021) Table 1, FLOPs = 2 × MACs per 32×32 LR patch at ×4: SRResNet-O 5.20 G, CARN-O
    # (CARN-M, F=64) 1.15 G. SLS (CVPR 2022): CARN ×4 91.22 GMACs at 1280×720.
    assert CostReport.measure(meta(MSRResNet, 4)).flops_classsr == pytest.approx(5.20e9, rel=0.005)
    assert CostReport.measure(meta(CARNM, 4)).flops_classsr == pytest.approx(1.15e9, rel=0.005)
    assert macs_at_720p(meta(CARN, 4)) == pytest.approx(91.22e9, rel=0.005)


def test_grouped_transposed_and_matrix_products() -> None:
    x = torch.rand(1, 8, 5, 6)
    # Grouped conv: k²·C_in·C_out/groups·H_out·W_out = 9·8·16/4·30.
    assert count_macs(nn.Conv2d(8, 16, 3, padding=1, groups=4), x) == 9 * 8 * 16 // 4 * 30
    # Depthwise, stride 2 (output 3×3): 9·8·8/8·9.
    assert count_macs(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), x) == 9 * 8 * 9
    # Transposed, stride 2, output 10×12: at the output resolution 9·8·6/2·120; performed: 9·8·6/2·30.
    deconv = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    assert deconv(x).shape[-2:] == (10, 12)
    assert count_macs(deconv, x) == 9 * 8 * 6 // 2 * 120
    assert count_macs(deconv, x, transposed_conv_at_output=False) == 9 * 8 * 6 // 2 * 30
    # Linear on a batch of 4: 4·10·20; bmm (2, 3×5 @ 5×7): 2·3·5·7. Batch size scales the count.
    assert count_macs(nn.Linear(10, 20), torch.rand(4, 10)) == 4 * 10 * 20
    assert count_macs(torch.bmm, torch.rand(2, 3, 5), torch.rand(2, 5, 7)) == 2 * 3 * 5 * 7
    conv = nn.Conv2d(8, 4, 1)
    assert count_macs(conv, torch.rand(3, 8, 5, 6)) == 3 * count_macs(conv, x)


class MaskedConv(nn.Conv2d):
    """Toy simulated-sparse conv: a fixed weight mask, reporting only the kept weights' MACs."""

    def __init__(self, channels: int, keep_every: int) -> None:
        super().__init__(channels, channels, 3, padding=1)
        mask = torch.zeros_like(self.weight)
        mask.view(-1)[::keep_every] = 1.0
        self.register_buffer("mask", mask)
        self.last_macs = 0

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x, self.weight * self.mask, self.bias, padding=1)
        self.last_macs = int(self.mask.sum().item()) * out.shape[0] * out.shape[2] * out.shape[3]
        return out

    def reported_macs(self) -> int:
        return self.last_macs


class Outer(nn.Module):
    """A reporting module wrapping another one: the outer report wins."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MaskedConv(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def reported_macs(self) -> int:
        return 7


def test_reported_macs_hook_replaces_what_was_counted_inside() -> None:
    masked = MaskedConv(8, keep_every=4)
    kept = int(masked.mask.sum())
    assert kept == 9 * 8 * 8 // 4
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), masked, nn.ReLU(), masked, nn.Conv2d(8, 3, 1))
    x = torch.rand(1, 3, 10, 12)
    # Dense first conv + the masked conv twice (it is applied twice) at its kept weights + the 1×1 conv.
    assert count_macs(network, x) == 27 * 8 * 120 + 2 * kept * 120 + 8 * 3 * 120
    # Without the hook FlopCounterMode would have counted the dense 9·8·8 per call.
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    assert count_macs(dense, x) == 27 * 8 * 120 + 2 * 576 * 120 + 8 * 3 * 120
    assert count_macs(nn.Sequential(Outer(), nn.Conv2d(4, 1, 1)), torch.rand(1, 4, 5, 5)) == 7 + 4 * 25


def test_mac_counter_sums_several_modules_with_their_hooks() -> None:
    # Routed-inference style: a policy conv on 4 patches, then two branches on 3 and 1 of them.
    policy, dense, masked = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 3, padding=1), MaskedConv(3, keep_every=3)
    patches = torch.rand(4, 3, 6, 6)
    with torch.no_grad(), MacCounter(policy, dense, masked) as counter:
        policy(patches)
        dense(patches[:3])
        masked(patches[3:])
    kept = int(masked.mask.sum())
    assert counter.macs == 4 * 3 * 2 * 36 + 3 * 27 * 4 * 36 + kept * 36
    assert not masked._forward_hooks and not masked._forward_pre_hooks


def test_modes_are_restored_and_counting_runs_without_grad() -> None:
    network = EDSR(2, num_features=8, num_blocks=2)
    network.train()
    network.blocks[0].eval()
    seen: list[tuple[bool, bool]] = []
    network.head.register_forward_hook(lambda module, args, out: seen.append((module.training, out.requires_grad)))
    count_macs(network, torch.rand(1, 3, 8, 8))
    assert seen == [(False, False)]
    assert network.training and network.head.training and not network.blocks[0].training


def test_meta_device_gives_the_same_count_and_cost_report() -> None:
    network = EDSR(3, num_features=8, num_blocks=2)
    real = CostReport.measure(network)
    assert CostReport.measure(network.to("meta")) == real
    assert real.params == count_params(network)
    assert real.as_dict()["flops_classsr"] == 2 * real.macs_per_lr_patch_32
    with pytest.raises(ValueError, match="scale"):
        macs_at_720p(network, 4)
