"""SMSR: exactness of the sparse path, training forward, MAC counting, converter, tiny end-to-end fit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import effsr.methods.smsr as smsr  # noqa: E402
from effsr.methods.smsr import SMSR, analytic_macs_720p, convert_official_checkpoint  # noqa: E402

OFFICIAL_SPARSE_COUNTS = [[40, 55, 61, 64], [48, 60, 63, 64], [48, 57, 63, 64], [61, 64, 64, 64], [50, 59, 64, 64]]


def _set_channel_counts(network: SMSR, counts: list[list[int]]) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, per_layer in zip(network.body, counts, strict=True):
            logits = torch.zeros_like(module.body.ch_mask)
            for layer, n_sparse in enumerate(per_layer):
                order = torch.randperm(logits.shape[1], generator=generator)
                logits[0, order[:n_sparse], layer, 1] = 1.0
            module.body.ch_mask.copy_(logits)


@pytest.mark.parametrize("scale,size,batch", [(2, (17, 23), 2), (3, (16, 15), 1), (4, (9, 12), 3)])
def test_sparse_equals_hard_masks_random(scale: int, size: tuple[int, int], batch: int) -> None:
    torch.manual_seed(scale)
    network = SMSR(scale=scale, num_features=32, num_modules=3).eval()
    with torch.no_grad():
        for module in network.body:
            module.body.ch_mask.normal_()
            module.spa_mask[5].bias.zero_()
        x = torch.rand(batch, 3, *size)
        reference, sparse = network.forward_hard(x), network.forward_sparse(x)
    densities = [float(mask.mean()) for mask in network.last_spatial]
    assert any(0.0 < d < 1.0 for d in densities)
    assert reference.shape == (batch, 3, size[0] * scale, size[1] * scale)
    assert (reference - sparse).abs().max().item() <= 1e-4


def test_sparse_equals_hard_masks_official_counts() -> None:
    torch.manual_seed(0)
    network = SMSR(scale=2, pixel_range=1.0).eval()
    _set_channel_counts(network, OFFICIAL_SPARSE_COUNTS)
    assert network.sparse_channel_counts() == OFFICIAL_SPARSE_COUNTS
    with torch.no_grad():
        for module in network.body:
            module.spa_mask[5].bias.zero_()
    with torch.no_grad():
        x = torch.rand(1, 3, 21, 19)
        difference = (network.forward_hard(x) - network.forward_sparse(x)).abs().max().item()
        dense_difference = (network.forward_hard(x) - network.forward_dense(x)).abs().max().item()
    assert difference <= 1e-4
    assert dense_difference > difference


def test_training_forward_gradients_and_tau() -> None:
    torch.manual_seed(0)
    network = SMSR(scale=2, num_features=16, num_modules=2).train()
    network.tau = 0.5
    sr, sparsity = network.forward_train(torch.rand(2, 3, 10, 10))
    (sr.mean() + sparsity).backward()
    assert sr.shape == (2, 3, 20, 20)
    assert 0.0 < sparsity.item() <= 1.0
    assert network.body[0].body.ch_mask.grad.abs().sum() > 0
    assert network.body[0].spa_mask[0].weight.grad.abs().sum() > 0


def test_plan_cache_invalidated_on_weight_change() -> None:
    network = SMSR(scale=2, num_features=16, num_modules=1).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        network.forward_sparse(x)
        plan = network.body[0].body._plan
        network.forward_sparse(x)
        assert network.body[0].body._plan is plan
        network.body[0].body.body[1].weight.mul_(2.0)
        changed = network.forward_sparse(x)
        assert network.body[0].body._plan is not plan
        assert (changed - network.forward_hard(x)).abs().max().item() <= 1e-4


def test_macs_counted_by_flop_counter_below_dense() -> None:
    import effsr.cost as cost

    torch.manual_seed(0)
    network = SMSR(scale=2).eval()
    _set_channel_counts(network, OFFICIAL_SPARSE_COUNTS)
    x = torch.rand(1, 3, 24, 24)
    sparse_macs = cost.count_macs(network.forward_sparse, x)
    dense_macs = cost.count_macs(network.forward_dense, x)
    assert sparse_macs < dense_macs
    internal = sum(module.body.last_macs for module in network.body)
    assert internal < sparse_macs
    analytic_sparse, analytic_dense = analytic_macs_720p(network, 0.3)
    assert analytic_sparse < analytic_dense
    assert abs(analytic_dense - 224.1e9) / 224.1e9 < 0.03


def _official_state_dict(scale: int) -> dict[str, torch.Tensor]:
    network = SMSR(scale=scale, pixel_range=255.0)
    return {key: value.clone() for key, value in network.state_dict().items()}


def test_converter_round_trip_legacy_format(tmp_path: Path) -> None:
    state = _official_state_dict(2)
    assert state["body.0.body.ch_mask"].shape == (1, 64, 4, 2)
    assert state["body.4.spa_mask.5.weight"].shape == (16, 2, 3, 3)
    src = tmp_path / "SMSR_x2.pt"
    torch.save(state, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / "out" / "smsr_x2.ckpt"
    convert_official_checkpoint(str(src), str(dst), scale=2)
    checkpoint = torch.load(dst, map_location="cpu", weights_only=False)
    network = SMSR(**checkpoint["hyper_parameters"]["network"]["init_args"])
    network.load_state_dict({k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()})
    for key, value in state.items():
        assert torch.equal(network.state_dict()[key], value)
    assert network.pixel_range == 255.0
    with pytest.raises(smsr.CheckpointError, match="×2"):
        convert_official_checkpoint(str(src), str(tmp_path / "x4.ckpt"), scale=4)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_converter_refuses_malicious_pickle(tmp_path: Path) -> None:
    src = tmp_path / "evil.pt"
    torch.save({"head.0.weight": torch.zeros(1), "payload": _Evil()}, src)
    with pytest.raises(smsr.CheckpointError, match="unpickling"):
        convert_official_checkpoint(str(src), str(tmp_path / "out.ckpt"), scale=2)
    assert not (tmp_path / "out.ckpt").exists()


def test_tiny_fit_then_test_sparse_macs_below_dense(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import effsr.cli as cli

    config = Path(__file__).resolve().parents[1] / "experiments" / "tiny" / "smsr_x2.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli.main(["fit", "--config", str(config), "--trainer.max_steps", "40"])
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    cli.main(["test", "--config", str(config), "--ckpt_path", str(checkpoints[-1])])
    results = json.loads(next(tmp_path.rglob("test_results.json")).read_text())
    text = json.dumps(results)
    assert "psnr_y" in text
    for row in results.values():
        assert row["psnr_y"] > 0 and row["n_images"] > 0
        assert row["macs_720p"] < row["macs_720p_dense"]


def test_module_tau_schedule_loss_and_cost() -> None:
    module = smsr.SMSRModule(SMSR(scale=2, num_features=16, num_modules=2, pixel_range=255.0), sparsity_warmup_steps=10)
    module.set_schedule_value("tau", 0.7)
    assert module.network.tau == 0.7
    loss, logs = module.training_loss(torch.rand(2, 3, 12, 12) * 255, torch.rand(2, 3, 24, 24) * 255, {})
    assert torch.isfinite(loss) and "spatial_density_smm1" in logs and "dense_channels/smm1_layer3" in logs
    module.eval()
    with torch.no_grad():
        module.infer(torch.rand(1, 3, 15, 13) * 255)
    report = module.cost_report()
    assert 0 < report["spatial_density"] < 1 or report["macs_720p"] == report["macs_720p_dense"]
    assert report["macs_720p"] <= report["macs_720p_dense"]
    constant = smsr.SMSRModule(SMSR(scale=2, num_features=16, num_modules=1), constant_tau=1.0)
    constant.set_schedule_value("tau", 0.5)
    assert constant.network.tau == 1.0
