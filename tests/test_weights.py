"""effsr.weights: one safe loader for network weights, official layouts as filter functions."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from effsr.errors import CheckpointError
from effsr.weights import load_network_state, read_checkpoint, strip_prefix

if TYPE_CHECKING:
    from conftest import CodePickle

pytestmark = pytest.mark.unit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 1))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path, code_pickle: CodePickle) -> None:
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as file:
        pickle.dump({"state_dict": code_pickle}, file, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load reference_checkpoint .*evil.ckpt"):
        load_network_state(_net(), path, what="reference_checkpoint")
    assert not code_pickle.ran


def test_lightning_layout_with_network_prefix_loads_exactly(tmp_path: Path) -> None:
    source = _net()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    checkpoint = {"epoch": 3, "global_step": 10, "loops": {}, "optimizer_states": [],
                  "state_dict": {f"network.{k}": v for k, v in source.state_dict().items()}
                  | {"other.x": torch.ones(1)},
                  "effsr": {"structure": {}}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    target = _net()
    loaded = load_network_state(target, tmp_path / "last.ckpt")
    assert loaded["global_step"] == 10
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_dataparallel_and_branch_prefixes_are_filters(tmp_path: Path) -> None:
    source = _net()
    torch.save({f"module.branches.2.{k}": v for k, v in source.state_dict().items()}, tmp_path / "dp.pth")
    target = _net()
    load_network_state(target, tmp_path / "dp.pth", prefix=(), filter_fn=strip_prefix("branches.2."))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_mismatch_names_the_file_and_the_first_keys(tmp_path: Path) -> None:
    wider = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 1))
    torch.save(wider.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"dense_checkpoint '.*wide.pth' does not fit Sequential: "
                                              r"shape mismatch \['0.weight \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)'"):
        load_network_state(_net(), tmp_path / "wide.pth", what="dense_checkpoint")
    state = _net().state_dict()
    del state["1.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing \['1.bias'\]"):
        load_network_state(_net(), tmp_path / "partial.pth")
    load_network_state(_net(), tmp_path / "partial.pth", ignore_missing=lambda key: key.endswith("bias"))


def test_missing_and_truncated_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="split_model '.*nope.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt", "split_model")
    torch.save(_net().state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.pth.*complete"):
        read_checkpoint(tmp_path / "cut.pth")
