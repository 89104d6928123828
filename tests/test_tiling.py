"""Tiled and routed inference: whole-image coverage, exactness, routing equivalence; the deploy form."""

import pytest
import torch
from torch import nn

from effsr.inference import route_batch_size, route_overlay, routed_forward, tile_grid, tiled_forward
from effsr.inference.deploy import FusedConvActivation, deployed, fuse_conv_activations

pytestmark = pytest.mark.unit


class TwoConvSR(nn.Module):
    """Receptive radius 2 LR pixels (two 3×3 convs), zero padding, pixel-shuffle ×2."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        )
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.body(x))


@pytest.mark.parametrize("height,width", [(37, 53), (64, 64), (20, 90)])
def test_grid_covers_whole_image(height: int, width: int) -> None:
    covered = torch.zeros(height, width, dtype=torch.bool)
    for y, x in tile_grid(height, width, patch_size=16, stride=12):
        assert y + 16 <= height and x + 16 <= width
        covered[y:y + 16, x:x + 16] = True
    assert covered.all()


@pytest.mark.parametrize("height,width", [(37, 53), (40, 29), (12, 70)])
def test_crop_blend_equals_whole_image_inference(height: int, width: int) -> None:
    network = TwoConvSR().eval()
    lr = torch.rand(1, 3, height, width)
    with torch.no_grad():
        whole = network(lr)
    tiled = tiled_forward(lr, network, scale=2, patch_size=16, overlap=4, batch_size=3, blend="crop")
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_average_blend_is_exact_away_from_seams_and_bounded_near_them() -> None:
    network = TwoConvSR().eval()
    lr = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        whole = network(lr)
    averaged = tiled_forward(lr, network, scale=2, patch_size=16, overlap=8, blend="average")
    difference = (averaged - whole).abs()
    # Tile starts are 0, 8, 16, 24; with overlap 8 every LR pixel lies ≥ 2 px (the radius) from the cut edges
    # of each tile covering it except within 2 px of a tile edge; pixels 2..5 of each 8-px band are exact.
    exact_rows = [y for y in range(2 * 2, 38 * 2) if (y // 2) % 8 in (2, 3, 4, 5)]
    assert torch.allclose(averaged[..., exact_rows, :][..., :, [x for x in exact_rows]],
                          whole[..., exact_rows, :][..., :, [x for x in exact_rows]], atol=1e-6)
    assert difference.max() < whole.abs().max()


def test_routed_output_equals_each_patch_alone_through_its_network() -> None:
    networks = [TwoConvSR().eval(), nn.Sequential(TwoConvSR(), nn.Hardtanh(0, 0.3)).eval()]
    lr = torch.rand(1, 3, 45, 61)

    def by_brightness(patches: torch.Tensor) -> torch.Tensor:
        return (patches.mean(dim=(1, 2, 3)) > 0.5).long()

    routed = routed_forward(lr, networks, scale=2, policy=by_brightness, patch_size=16, overlap=4, batch_size=5,
                            count_macs=True)
    assert routed.sr.shape == (1, 3, 90, 122)
    assert int(routed.patches_per_network.sum()) == len(routed.corners)
    expected = torch.zeros_like(routed.sr)
    weight = torch.zeros(1, 1, 90, 122)
    with torch.no_grad():
        for (y, x), choice in zip(routed.corners, routed.route_map.flatten().tolist(), strict=True):
            patch = lr[..., y:y + 16, x:x + 16]
            expected[..., 2 * y:2 * y + 32, 2 * x:2 * x + 32] += networks[choice](patch)
            weight[..., 2 * y:2 * y + 32, 2 * x:2 * x + 32] += 1
    assert torch.allclose(routed.sr, expected / weight, atol=1e-6)
    macs_per_patch = 16 * 16 * 9 * (3 * 8 + 8 * 12)
    assert routed.macs == len(routed.corners) * macs_per_patch


def test_route_overlay_tints_each_patch() -> None:
    image = torch.full((32, 32, 3), 100, dtype=torch.uint8).numpy()
    route_map = torch.tensor([[0, 1], [2, 0]])
    corners = [(0, 0), (0, 16), (16, 0), (16, 16)]
    tinted = route_overlay(image, route_map, corners, patch_size=16)
    assert tinted.shape == image.shape
    assert not (tinted[0, 0] == tinted[0, 16]).all()
    assert (tinted[0, 0] == tinted[16, 16]).all()


class FunctionalActivations(nn.Module):
    """Conv→F.leaky_relu, conv→PixelShuffle→ReLU module, conv→.relu(), and a conv read twice (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle, self.relu = nn.PixelShuffle(2), nn.ReLU(inplace=True)
        self.last = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.leaky_relu(self.first(x), negative_slope=0.2)
        pre = self.twice(out)
        out = torch.nn.functional.relu(pre) + pre                       # `pre` has two users: stays unfused
        return self.last(self.relu(self.shuffle(self.up(out)))).relu()  # `last` feeds a .relu(): fused


class NotAConv(nn.Conv2d):
    """A Conv2d subclass that computes something else from its weight: must never be fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _fused_convs(network: nn.Module) -> list[nn.Module]:
    return [module.conv for module in network.modules() if isinstance(module, FusedConvActivation)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_deploy_form_equals_the_plain_network_and_shares_its_weights(channels_last: bool) -> None:
    network = FunctionalActivations().eval()
    fused = fuse_conv_activations(network)
    assert _fused_convs(fused) == [network.first, network.up, network.last]   # by identity: weights shared
    lr = torch.rand(3, 3, 12, 10)
    if channels_last:
        network, lr = network.to(memory_format=torch.channels_last), lr.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (fused(lr) - network(lr)).abs().max() <= 1e-6
        network.up.weight.mul_(-1)                                              # new weights need no re-trace
        assert (fused(lr) - network(lr)).abs().max() <= 1e-6
    slopes = sorted(module.negative_slope for module in fused.modules() if isinstance(module, FusedConvActivation))
    assert slopes == [0.0, 0.0, 0.2]


def test_deploy_leaves_subclassed_convs_and_untraceable_networks_alone() -> None:
    subclassed = nn.Sequential(NotAConv(3, 3, 3, padding=1), nn.ReLU())
    assert fuse_conv_activations(subclassed) is subclassed

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)) if x.mean() > 0 else x

    untraceable = DataDependent()
    assert fuse_conv_activations(untraceable) is untraceable


def test_deployed_is_cached_until_a_layer_is_replaced() -> None:
    network = TwoConvSR().eval()
    first = deployed(network)
    assert first is not network and deployed(network) is first
    network.body[0] = nn.Conv2d(3, 8, 3, padding=1)
    second = deployed(network)
    assert second is not first and _fused_convs(second) == [network.body[0]]
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (second(lr) - network(lr)).abs().max() <= 1e-6


def test_routed_deploy_form_equals_plain_routing() -> None:
    networks = [TwoConvSR().eval(), nn.Sequential(TwoConvSR(), nn.Hardtanh(0, 0.3)).eval()]
    lr = torch.rand(1, 3, 45, 61)

    def by_brightness(patches: torch.Tensor) -> torch.Tensor:
        return (patches.mean(dim=(1, 2, 3)) > 0.5).long()

    plain = routed_forward(lr, networks, scale=2, policy=by_brightness, patch_size=16, overlap=4, batch_size=5)
    fused = routed_forward(lr, networks, scale=2, policy=by_brightness, patch_size=16, overlap=4, batch_size=5,
                           deploy=True)
    assert all(len(_fused_convs(deployed(network))) == 1 for network in networks)
    assert torch.equal(fused.route_map, plain.route_map)
    assert (fused.sr - plain.sr).abs().max() <= 1e-6


class BatchRecorder(nn.Module):
    """Records the number of tiles in every call."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network, self.sizes = network, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.network(x)


def test_route_batch_defaults_to_a_cache_sized_cpu_batch_and_does_not_change_the_output() -> None:
    assert route_batch_size(torch.device("cpu")) == 4
    assert route_batch_size(torch.device("cuda")) == 64  # a device object: no GPU needed
    lr = torch.rand(1, 3, 45, 61)
    recorder = BatchRecorder(TwoConvSR().eval())
    policy_sizes: list[int] = []

    def everything_to_zero(patches: torch.Tensor) -> torch.Tensor:
        policy_sizes.append(patches.shape[0])
        return torch.zeros(patches.shape[0], dtype=torch.long)

    default = routed_forward(lr, [recorder], scale=2, policy=everything_to_zero, patch_size=16, overlap=4)
    assert max(recorder.sizes) == max(policy_sizes) == 4 and sum(recorder.sizes) == len(default.corners)
    recorder.sizes.clear()
    large = routed_forward(lr, [recorder], scale=2, policy=everything_to_zero, patch_size=16, overlap=4,
                           batch_size=64)
    assert recorder.sizes == [len(default.corners)]
    assert (default.sr - large.sr).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        routed_forward(lr, [recorder], scale=2, policy=everything_to_zero, batch_size=0)
