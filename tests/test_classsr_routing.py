"""benchmarks/classsr_routing.py: routings of a ClassSR model's branches stitched from recorded tile outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from effsr.methods.classsr import ClassSRModule, ClassSRNet
from effsr.metrics import psnr

REPO = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("classsr_routing", REPO / "benchmarks" / "classsr_routing.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))  # the script adds its folder for _routing_replay
    return script


def _module() -> ClassSRModule:
    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.MSRResNet", widths=[4, 6, 8], width_arg="num_features", scale=4,
                         backbone_args={"num_blocks": 1})
    network.classifier = _BrightnessClassifier()  # routes by the tile's mean, so every branch gets tiles
    return ClassSRModule(network=network).eval()


class _BrightnessClassifier(torch.nn.Module):
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        mean = tiles.mean(dim=(1, 2, 3))
        return torch.stack([-(mean - 0.2).abs(), -(mean - 0.5).abs(), -(mean - 0.8).abs()], dim=1)


@pytest.mark.unit
def test_routings_equal_routed_inference_and_their_definitions() -> None:
    """The classifier's routing is the model's own routed inference; a constant routing is a branch; the -O
    class routing follows the thresholds; a huge MAC penalty routes every tile to the narrow branch."""
    script, module = _script(), _module()
    reference = SimpleNamespace(network=module.network.branches[-1], pixel_range=module.pixel_range)
    generator = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 0.8, 90).expand(1, 3, 40, 90)  # dark to bright tiles
    images = [{"lr": ramp + 0.2 * torch.rand(1, 3, 40, 90, generator=generator),
               "hr": torch.rand(1, 3, 160, 360, generator=generator), "name": [f"image{index}"]} for index in range(2)]
    with torch.no_grad():
        routed = [float(psnr(module.super_resolve(image["lr"]), image["hr"], crop_border=4)[0]) for image in images]
        choices = [module.route(image["lr"]).route_map.flatten() for image in images]

    def run(thresholds: list[float]) -> dict:
        module.split_thresholds = thresholds
        return script.evaluate_set(module, reference, images, [0.0, 1e6])["routes"]

    low, high = run([-100.0, -200.0]), run([1000.0, 999.0])
    assert low["classifier"]["psnr_y"] == pytest.approx(sum(routed) / 2, abs=1e-4)
    counts = torch.bincount(torch.cat(choices), minlength=3).double()
    assert (counts > 0).all()
    assert low["classifier"]["shares"] == pytest.approx((counts / counts.sum()).tolist())
    assert low["by -O class"]["psnr_y"] == pytest.approx(low["branch 0"]["psnr_y"], abs=1e-9)
    assert high["by -O class"]["psnr_y"] == pytest.approx(high["branch 2"]["psnr_y"], abs=1e-9)
    assert low["branch 2"]["psnr_y"] == pytest.approx(low["-O tiled"]["psnr_y"], abs=1e-9)
    assert low["oracle λ=1e+06"]["shares"] == [1.0, 0.0, 0.0]
    assert low["branch 2"]["flops_percent_of_O"] == pytest.approx(100.0)
    assert low["branch 0"]["flops_percent_of_O"] < low["branch 1"]["flops_percent_of_O"] < 100.0
    assert low["-O (whole image)"]["delta_vs_O"] == 0.0
