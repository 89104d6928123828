"""effsr.ops.imresize against the plain reference port on real photographs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from effsr.ops import bicubic_degrade, imresize, imresize_uint8

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _reference_imresize import reference_imresize, reference_imresize_uint8  # noqa: E402

pytestmark = pytest.mark.unit

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.6, 0.75, 0.9, 4.0])
def test_uint8_matches_reference(name: str, scale: float) -> None:
    photo = PHOTOS[name]()[:120, :150]
    ours = imresize_uint8(photo, scale)
    reference = reference_imresize_uint8(photo, scale)
    assert ours.shape == (math.ceil(120 * scale), math.ceil(150 * scale), 3)
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert difference.max() <= 1
    assert (difference == 0).mean() >= 0.999
    float_ours = imresize(torch.from_numpy(photo).permute(2, 0, 1).double(), scale).permute(1, 2, 0).numpy()
    assert np.abs(float_ours - reference_imresize(photo, scale)).max() < 1e-6


def test_layouts_agree_and_degrade_crops() -> None:
    photo = torch.from_numpy(data.astronaut()[:61, :50]).permute(2, 0, 1).float() / 255
    batched = imresize(photo[None].repeat(2, 1, 1, 1), 0.5)
    single = imresize(photo, 0.5)
    gray = imresize(photo[0], 0.5)
    assert torch.allclose(batched[1], single) and torch.allclose(single[0], gray, atol=1e-6)
    hr, lr = bicubic_degrade(data.astronaut()[:61, :50], 4)
    assert hr.shape == (60, 48, 3) and lr.shape == (15, 12, 3) and lr.dtype == np.uint8
