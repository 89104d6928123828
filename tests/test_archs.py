"""Backbones: shapes at ×2/×3/×4, parameter counts against the published ones, pixel-range handling."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from effsr.archs import CARN, CARNM, EDSR, FSRCNN, LEDSR, RCAN, BicubicSR, FSRCNNOfficial, MSRResNet, Upsampler
from effsr.methods.classsr import ClassSRNet
from effsr.methods.smsr import SMSR

pytestmark = pytest.mark.unit

# Small configurations for forward passes (published widths are checked on the meta device below).
SMALL = {
    EDSR: {"num_features": 8, "num_blocks": 2},
    LEDSR: {"num_features": 8, "num_blocks": 2},
    CARN: {"num_features": 8},
    CARNM: {"num_features": 8, "group": 4},
    FSRCNN: {"num_features": 8, "shrink_features": 4, "num_mapping": 2},
    FSRCNNOfficial: {"num_features": 8, "shrink_features": 4, "num_mapping": 2},
    MSRResNet: {"num_features": 8, "num_blocks": 2},
    RCAN: {"num_features": 16, "num_groups": 2, "num_blocks": 2, "reduction": 4},
    SMSR: {"num_features": 16, "num_modules": 1, "num_layers": 2},
    ClassSRNet: {"backbone": "effsr.archs.MSRResNet", "widths": [4, 6, 8], "backbone_args": {"num_blocks": 1}},
}


def count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def conv(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> int:
    """Parameters of a conv with bias: k²·C_in·C_out/groups + C_out."""
    return k * k * c_in * c_out // groups + c_out


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("cls", list(SMALL), ids=lambda cls: cls.__name__)
def test_output_is_scale_times_input(cls: type[nn.Module], scale: int) -> None:
    network = cls(scale, **SMALL[cls])
    assert network.scale == scale and network.pixel_range == 1.0
    out = network(torch.rand(2, 3, 11, 7))
    assert out.shape == (2, 3, 11 * scale, 7 * scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [*SMALL, BicubicSR], ids=lambda cls: cls.__name__)
def test_unsupported_scale_is_refused(cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match="scale"):
        cls(5)


def test_edsr_baseline_param_count() -> None:
    # EDSR-baseline ×4 (F=64, R=16): head + 16 blocks of two convs + body conv + 2 × (conv 64→256 + shuffle)
    # + tail. Published: "1.5 M" (EDSR paper, Table 1; the official repo's baseline ×4 = 1,517,571).
    expected = conv(3, 64) + 16 * 2 * conv(64, 64) + conv(64, 64) + 2 * conv(64, 256) + conv(64, 3)
    assert expected == 1_517_571
    with torch.device("meta"):
        assert count(EDSR(4)) == expected
        # Full EDSR ×4 (F=256, R=32, res_scale 0.1): published 43 M.
        full = EDSR(4, num_features=256, num_blocks=32, res_scale=0.1)
    assert count(full) == pytest.approx(43.0e6, rel=0.01)


def test_ledsr_param_counts_match_assl() -> None:
    # LEDSR: head + R blocks + body conv + one conv F→3s². ASSL's F=49 pruned model ("ASSLN") has
    # 0.72 M params at ×2 and 0.74 M at ×4 (ASSL paper, Tables 3/4; docs/methods/assl.md).
    def expected(features: int, scale: int) -> int:
        return conv(3, features) + 16 * 2 * conv(features, features) + conv(features, features) \
            + conv(features, 3 * scale * scale)

    with torch.device("meta"):
        for scale, published in [(2, 0.72e6), (4, 0.74e6)]:
            assert count(LEDSR(scale, num_features=49)) == expected(49, scale)
            assert expected(49, scale) == pytest.approx(published, rel=0.01)
        assert count(LEDSR(4)) == expected(256, 4)


def test_carn_param_counts() -> None:
    # Single-scale CARN ×4: entry + 3 cascading blocks (3 residual blocks of two convs, 1×1 fusions 128/192/256→64)
    # + global 1×1 fusions + 2 × (conv 64→256) + exit = 1,111,875 ("1.11 M").
    block = 3 * 2 * conv(64, 64) + conv(128, 64, 1) + conv(192, 64, 1) + conv(256, 64, 1)
    fusions = conv(128, 64, 1) + conv(192, 64, 1) + conv(256, 64, 1)
    expected = conv(3, 64) + 3 * block + fusions + 2 * conv(64, 256) + conv(64, 3)
    assert expected == 1_111_875
    with torch.device("meta"):
        carn = CARN(4)
        assert count(carn) == expected
        # The paper's 1,592 K is the multi-scale model: the same trunk with ×2 and ×3 upsamplers added.
        multi_scale = count(carn) + count(Upsampler(2, 64)) + count(Upsampler(3, 64))
        assert multi_scale == pytest.approx(1_592e3, rel=0.002)
        # CARN-M (group 4, recursive efficient blocks): paper 412 K, also multi-scale.
        carn_m = CARNM(4)
        multi_scale_m = count(carn_m) + count(Upsampler(2, 64, groups=4)) + count(Upsampler(3, 64, groups=4))
        assert multi_scale_m == pytest.approx(412e3, rel=0.01)


def test_fsrcnn_param_count() -> None:
    # FSRCNN(56, 12, 4), RGB, ×4: 5×5 3→56, 1×1 56→12, 4 × 3×3 12→12, 1×1 12→56, PReLUs (56+12+4·12+56),
    # 9×9 deconv 56→3. = 24,683 ("≈ 25 K" for ClassSR's RGB FSRCNN-O).
    expected = conv(3, 56, 5) + conv(56, 12, 1) + 4 * conv(12, 12) + conv(12, 56, 1) + (56 + 12 + 4 * 12 + 56) \
        + 9 * 9 * 56 * 3 + 3
    assert expected == 24_683
    assert count(FSRCNN(4)) == expected


def test_msrresnet_and_rcan_param_counts() -> None:
    with torch.device("meta"):
        # BasicSR MSRResNet ×4: published 1.5 M (same layer inventory as EDSR-baseline: 1,517,571).
        assert count(MSRResNet(4)) == pytest.approx(1.52e6, rel=0.01)
        # RCAN ×4: published 15.6 M (RCAN paper / official repo). Per RCAB: 2 convs + CA 1×1 64→4 and 4→64.
        rcab = 2 * conv(64, 64) + conv(64, 4, 1) + conv(4, 64, 1)
        expected = conv(3, 64) + 10 * (20 * rcab + conv(64, 64)) + conv(64, 64) + 2 * conv(64, 256) + conv(64, 3)
        assert count(RCAN(4)) == expected
        assert expected == pytest.approx(15.6e6, rel=0.005)


@pytest.mark.parametrize(("cls", "widths"), [(FSRCNN, [16, 36, 56]), (CARNM, [36, 52, 64]),
                                             (MSRResNet, [36, 52, 64]), (RCAN, [36, 50, 64])],
                         ids=lambda value: getattr(value, "__name__", ""))
def test_classsr_branch_widths(cls: type[nn.Module], widths: list[int]) -> None:
    depth = {MSRResNet: {"num_blocks": 1}, RCAN: {"num_groups": 1, "num_blocks": 1}}.get(cls, {})
    counts = []
    for width in widths:
        network = cls(4, num_features=width, **depth)
        assert network(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
        counts.append(count(network))
    assert counts == sorted(counts) and len(set(counts)) == 3
    if cls is RCAN:
        narrow = RCAN(4, num_features=36, num_groups=1, num_blocks=1)
        assert narrow.groups[0].blocks[0].attention.squeeze.out_channels == 36 // 16


def test_carnm_group_must_divide_width() -> None:
    with pytest.raises(ValueError, match="divide"):
        CARNM(4, num_features=50, group=4)


@pytest.mark.parametrize("cls", [EDSR, LEDSR, CARN, CARNM, FSRCNN, MSRResNet], ids=lambda cls: cls.__name__)
def test_pixel_range_scales_the_mean_shift(cls: type[nn.Module]) -> None:
    # With all biases zero these networks are positively homogeneous (ReLU/LeakyReLU/PReLU, linear skips)
    # once the mean shift is scaled with the range: f_255(255·x) = 255·f_1(x) for the same weights.
    # (RCAN's sigmoid channel attention is not homogeneous, so it is not part of this check.)
    torch.manual_seed(0)
    unit = cls(2, **SMALL[cls])
    for name, parameter in unit.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(parameter)
    wide = cls(2, pixel_range=255.0, **SMALL[cls])
    wide.load_state_dict(unit.state_dict())
    assert wide.pixel_range == 255.0
    x = torch.rand(1, 3, 9, 8)
    torch.testing.assert_close(wide(255.0 * x), 255.0 * unit(x), rtol=1e-4, atol=1e-3)


def test_ledsr_layer_kinds_for_assl() -> None:
    network = LEDSR(2, num_features=8, num_blocks=3)
    modules = dict(network.named_modules())
    kinds = network.prunable_layers()
    assert kinds["free"] == ["blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"]
    assert kinds["constrained"] == ["head", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2", "body_conv"]
    assert all(isinstance(modules[name], nn.Conv2d) for names in kinds.values() for name in names)
    assert modules["tail_conv"].out_channels == 3 * 2 * 2
    assert not any(isinstance(module, nn.ReLU) and module.inplace for module in network.modules())
    # Tracing works (ASSL builds its channel dependency graph from a trace).
    traced = torch.fx.symbolic_trace(network)
    x = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(traced(x), network(x))


def test_bicubic_delegates_to_matlab_imresize(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], float | None]] = []

    def fake_imresize(image: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        calls.append((tuple(image.shape), scale))
        return image.repeat_interleave(int(scale), -1).repeat_interleave(int(scale), -2)

    monkeypatch.setitem(sys.modules, "effsr.ops.imresize", types.SimpleNamespace(imresize=fake_imresize))
    out = BicubicSR(3)(torch.rand(2, 3, 5, 4))
    assert calls == [((2, 3, 5, 4), 3)] and out.shape == (2, 3, 15, 12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_is_parameter_free_and_keeps_constants(scale: int) -> None:
    network = BicubicSR(scale)
    assert count(network) == 0
    flat = torch.full((1, 3, 10, 7), 0.25)
    out = network(flat)
    assert out.shape == (1, 3, 10 * scale, 7 * scale)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
