"""SMSR against the official code and issue 17: deployed parameter count, the pre-fix layer rule, the dense
baseline, the weights policy, configs after the package split, and the sparse path's dense fallback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from effsr.errors import CheckpointError, ConfigError
from effsr.methods.smsr import (
    SMB,
    SMSR,
    SMSRModule,
    analytic_macs_720p,
    deployed_params,
    load_smsr_weights,
    plain_macs_720p,
)

if TYPE_CHECKING:
    from conftest import CodePickle

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def _hand_count(scale: int, width: int = 64, modules: int = 5, layers: int = 4, masks: bool = True) -> int:
    """Deployed SMSR parameters counted from the architecture (docs/methods/smsr.md), without the channel-mask
    logits and the frozen mean shifts."""
    quarter = width // 4
    head = _conv(3, width, 3) + _conv(width, width, 3)
    spatial = _conv(width, quarter, 3) + _conv(quarter, quarter, 3) + 9 * quarter * 2 + 2  # transposed conv
    smb = layers * _conv(width, width, 3, bias=False) + _conv(width * layers, width, 1)
    attention = _conv(width, width // 16, 1) + _conv(width // 16, width, 1)
    collect = _conv(width * modules, width, 1) + _conv(width, width, 3)
    tail = _conv(width, 3 * scale * scale, 3)
    return head + modules * ((spatial if masks else 0) + smb + attention) + collect + tail


@pytest.mark.unit
@pytest.mark.parametrize(("scale", "paper_k"), [(2, 985), (3, 993), (4, 1006)])
def test_params_are_what_the_deployed_model_stores(scale: int, paper_k: int) -> None:
    network = SMSR(scale, pixel_range=255.0)
    expected = _hand_count(scale)
    assert deployed_params(network) == expected
    assert round(expected / 1000) == paper_k
    all_parameters = sum(parameter.numel() for parameter in network.parameters())
    assert all_parameters - expected == 5 * 64 * 4 * 2 + 2 * 12  # ch_mask logits + two 1x1 mean shifts
    assert SMSRModule(network).cost_report()["params"] == expected


def _pre_fix_reference(block: SMB, x: Tensor, spatial: Tensor, channel: Tensor, lag: int) -> Tensor:
    """The layer rule written out from its definition: layer i's input is split by the masks of layer i − lag
    (lag 1: the fixed rule; lag 0: the first official code's d_i/s_i)."""
    outputs, feature = [], x
    for i, conv in enumerate(block.body):
        d, s = channel[:, :, i:i + 1, 0:1], channel[:, :, i:i + 1, 1:2]
        if i == 0:
            out = conv(feature)
            feature = out * s * spatial + out * d
        else:
            d_in, s_in = channel[:, :, i - lag:i - lag + 1, 0:1], channel[:, :, i - lag:i - lag + 1, 1:2]
            f_d, f_s = conv(feature * d_in), conv(feature * s_in)
            feature = f_d * s * spatial + f_d * d + f_s * s * spatial + f_s * d * spatial
        feature = F.relu(feature)
        outputs.append(feature)
    return block.collect(torch.cat(outputs, 1))


@pytest.mark.unit
def test_layer_rules_follow_their_definitions() -> None:
    torch.manual_seed(0)
    block = SMB(8, n_layers=3)
    x = torch.randn(2, 8, 7, 9)
    spatial = (torch.rand(2, 1, 7, 9) > 0.5).float()
    channel = torch.rand(1, 8, 3, 2).softmax(3)  # soft [dense, sparse] weights that differ per layer
    with torch.no_grad():
        fixed = block.forward_masked(x, spatial, channel, "fixed")
        pre_fix = block.forward_masked(x, spatial, channel, "pre_fix")
        torch.testing.assert_close(fixed, _pre_fix_reference(block, x, spatial, channel, lag=1), rtol=0, atol=1e-6)
        torch.testing.assert_close(pre_fix, _pre_fix_reference(block, x, spatial, channel, lag=0), rtol=0, atol=1e-6)
    assert (fixed - pre_fix).abs().max() > 1e-3  # the two rules are different functions
    with pytest.raises(ValueError, match="layer_rule"):
        block.forward_masked(x, spatial, channel, "other")


@pytest.mark.unit
def test_module_trains_with_the_chosen_layer_rule() -> None:
    network = SMSR(2, num_features=16, num_modules=1, num_layers=3, pixel_range=255.0)
    module = SMSRModule(network, layer_rule="pre_fix", sparsity_warmup_steps=0)
    lr, hr = torch.rand(1, 3, 8, 8) * 255, torch.rand(1, 3, 16, 16) * 255
    torch.manual_seed(5)
    loss, _ = module.training_loss(lr, hr, {})
    torch.manual_seed(5)
    sr, sparsity = network.forward_train(lr, "pre_fix")
    torch.testing.assert_close(loss, F.l1_loss(sr, hr) + 0.1 * sparsity)
    torch.manual_seed(5)
    sr_fixed, _ = network.forward_train(lr, "fixed")
    assert (sr - sr_fixed).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="layer_rule"):
        SMSRModule(SMSR(2, num_features=16, num_modules=1), layer_rule="prefix")  # type: ignore[arg-type]


@pytest.mark.unit
def test_dense_masks_baseline_runs_every_channel_everywhere_and_costs_the_plain_network() -> None:
    torch.manual_seed(1)
    network = SMSR(2, num_features=16, num_modules=2, pixel_range=255.0)
    module = SMSRModule(network, dense_masks=True)
    lr, hr = torch.rand(1, 3, 10, 12) * 255, torch.rand(1, 3, 20, 24) * 255
    loss, logs = module.training_loss(lr, hr, {})
    assert set(logs) == {"l1"}
    torch.testing.assert_close(loss, F.l1_loss(network.forward_dense(lr), hr))
    loss.backward()
    assert all(smm.spa_mask[0].weight.grad is None for smm in network.body)  # mask branches never run
    network.eval()
    with module.measuring() as measured, torch.no_grad():
        out = module.infer(lr)
    assert measured == {}
    torch.testing.assert_close(out, network.forward_dense(lr))
    # the plain network's MACs per LR pixel, from the architecture: head, 2 x (4 convs + 1x1 collect + CA),
    # collect 1x1 + 3x3, tail (CA's pooled 1x1s are per image, not per pixel)
    width, pixels = 16, 360 * 640
    per_pixel = (9 * 3 * width + 9 * width * width + 2 * (4 * 9 * width * width + 4 * width * width)
                 + 2 * width * width + 9 * width * width + 9 * width * 12)
    report = module.cost_report()
    assert report["macs_720p"] == pytest.approx(pixels * per_pixel, rel=1e-6)
    assert report["macs_720p"] == plain_macs_720p(network) < analytic_macs_720p(network, 1.0)[1]
    assert report["params"] == _hand_count(2, width=16, modules=2, masks=False)


@pytest.mark.unit
def test_smsr_weights_with_code_in_the_pickle_are_refused(tmp_path: Path, code_pickle: CodePickle) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"head.0.weight": torch.zeros(1), "payload": code_pickle}, evil)
    with pytest.raises(CheckpointError, match="unpickling"):
        load_smsr_weights(str(evil))
    assert not code_pickle.ran


@pytest.mark.unit
def test_official_layout_filter_accepts_dataparallel_and_effsr_prefixes(tmp_path: Path) -> None:
    network = SMSR(2, num_features=16, num_modules=1, pixel_range=255.0)
    state = network.state_dict()
    for prefix in ("module.", "network."):
        path = tmp_path / f"{prefix}pt"
        torch.save({"state_dict": {prefix + key: value for key, value in state.items()}}, path)
        loaded = load_smsr_weights(str(path))
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())


@pytest.mark.integration
def test_printed_config_still_loads_after_the_package_split(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import effsr.cli as cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--config", str(EXPERIMENTS / "tiny" / "smsr_x2.yaml"), "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: effsr.methods.smsr.SMSRModule" in printed
    assert "class_path: effsr.methods.smsr.SMSR\n" in printed
    assert "layer_rule: fixed" in printed and "dense_masks: false" in printed
    saved = tmp_path / "config.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit) as again:
        cli.main(["fit", "--config", str(saved), "--model.init_args.layer_rule=pre_fix", "--print_config"])
    assert again.value.code in (0, None)
    assert "layer_rule: pre_fix" in capsys.readouterr().out


@pytest.mark.unit
@pytest.mark.parametrize(("fill", "dense_above", "path"), [(0.15, 0.5, "sparse"), (0.8, 0.5, "dense"),
                                                            (0.8, 2.0, "sparse"), (0.15, 0.0, "dense")])
def test_sparse_path_falls_back_to_dense_convs_by_density_and_stays_exact(fill: float, dense_above: float,
                                                                          path: str) -> None:
    torch.manual_seed(4)
    network = SMSR(2, num_features=16, num_modules=2, num_layers=3).eval()
    with torch.no_grad():
        for smm in network.body:
            smm.body.ch_mask.normal_()
            smm.body.dense_above = dense_above
        x = torch.rand(2, 3, 13, 11)
        network.forced_spatial = [(torch.rand(2, 1, 13, 11) < fill).float() for _ in network.body]
        reference, sparse = network.forward_hard(x), network.forward_sparse(x)
    assert [smm.body.last_path for smm in network.body] == [path, path]
    assert (reference - sparse).abs().max().item() <= 1e-4
    if path == "dense":  # 3 convs of 9·C², the 1x1 collect (3C → C) and the sparse→dense corrections per pixel
        sparse = network.body[0].body.hard_channel_mask().sum(0).tolist()
        correction = sum(9 * sparse[i - 1] * (16 - sparse[i]) for i in (1, 2))
        assert network.body[0].body.last_macs == 2 * 13 * 11 * (3 * 9 * 16 * 16 + 3 * 16 * 16 + correction)


@pytest.mark.unit
def test_dense_fallback_with_all_sparse_or_all_dense_channels() -> None:
    torch.manual_seed(6)
    network = SMSR(2, num_features=16, num_modules=2, num_layers=3).eval()
    with torch.no_grad():
        for smm, sparse in zip(network.body, (1.0, 0.0), strict=True):
            smm.body.ch_mask[..., 1], smm.body.ch_mask[..., 0] = sparse, 1.0 - sparse
            smm.body.dense_above = 0.0
        x = torch.rand(1, 3, 9, 10)
        network.forced_spatial = [(torch.rand(1, 1, 9, 10) < 0.5).float() for _ in network.body]
        assert (network.forward_hard(x) - network.forward_sparse(x)).abs().max().item() <= 1e-4
