"""SMSR: exactness of the sparse path, training forward, MAC counting, converter, tiny end-to-end fit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import effsr.methods.smsr as smsr  # noqa: E402
from effsr.errors import CheckpointError
from effsr.methods.smsr import SMSR, analytic_macs_720p, convert_official_checkpoint  # noqa: E402

if TYPE_CHECKING:
    from conftest import CodePickle

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


@pytest.mark.unit
@pytest.mark.parametrize("scale,size,batch", [(2, (17, 23), 2), (3, (16, 15), 1), (4, (9, 12), 3)])
def test_sparse_equals_hard_masks_random(scale: int, size: tuple[int, int], batch: int,
                                         smsr_with_random_masks: Callable[[int], SMSR]) -> None:
    network = smsr_with_random_masks(scale)
    with torch.no_grad():
        x = torch.rand(batch, 3, *size)
        reference, sparse = network.forward_hard(x), network.forward_sparse(x)
    densities = [float(mask.mean()) for mask in network.last_spatial]
    assert any(0.0 < d < 1.0 for d in densities)
    assert reference.shape == (batch, 3, size[0] * scale, size[1] * scale)
    assert (reference - sparse).abs().max().item() <= 1e-4


@pytest.mark.unit
@pytest.mark.parametrize("spatial_fill", [0.0, 1.0])
@pytest.mark.parametrize("channel_kind", ["all_sparse", "all_dense"])
def test_sparse_equals_hard_masks_extremes(spatial_fill: float, channel_kind: str) -> None:
    """Empty and full spatial masks, every channel sparse or every channel dense: no empty-tensor corner breaks."""
    torch.manual_seed(3)
    network = SMSR(scale=2, num_features=16, num_modules=2).eval()
    with torch.no_grad():
        for module in network.body:
            sparse = 1.0 if channel_kind == "all_sparse" else 0.0
            module.body.ch_mask[..., 1] = sparse
            module.body.ch_mask[..., 0] = 1.0 - sparse
        x = torch.rand(2, 3, 11, 13)
        network.forced_spatial = [torch.full((2, 1, 11, 13), spatial_fill) for _ in network.body]
        difference = (network.forward_hard(x) - network.forward_sparse(x)).abs().max().item()
    assert difference <= 1e-4
    assert [float(mask.mean()) for mask in network.last_spatial] == [spatial_fill] * 2


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_macs_counted_by_flop_counter_below_dense() -> None:
    import effsr.cost as cost

    torch.manual_seed(0)
    network = SMSR(scale=2).eval()
    _set_channel_counts(network, OFFICIAL_SPARSE_COUNTS)
    for module in network.body:
        module.body.dense_above = 2.0  # every block on gathers: the count the analytic formula describes
    x = torch.rand(1, 3, 24, 24)
    sparse_macs = cost.count_macs(network.forward_sparse, x)
    densities = [float(mask.mean()) for mask in network.last_spatial]
    dense_macs = cost.count_macs(network.forward_dense, x)
    assert sparse_macs < dense_macs
    internal = sum(module.body.last_macs for module in network.body)
    assert internal < sparse_macs
    per_pixel = analytic_macs_720p(network, densities)[0] / (360 * 640)
    assert abs(sparse_macs / (24 * 24) - per_pixel) / per_pixel < 0.01
    analytic_sparse, analytic_dense = analytic_macs_720p(network, 0.3)
    assert analytic_sparse < analytic_dense
    assert abs(analytic_dense - 224.1e9) / 224.1e9 < 0.03


def _official_state_dict(scale: int) -> dict[str, torch.Tensor]:
    network = SMSR(scale=scale, pixel_range=255.0)
    return {key: value.clone() for key, value in network.state_dict().items()}


@pytest.mark.unit
def test_converter_round_trip_legacy_format(tmp_path: Path) -> None:
    state = _official_state_dict(2)
    assert state["body.0.body.ch_mask"].shape == (1, 64, 4, 2)
    assert state["body.4.spa_mask.5.weight"].shape == (16, 2, 3, 3)
    src = tmp_path / "SMSR_x2.pt"
    torch.save(state, src, _use_new_zipfile_serialization=False)
    dst = tmp_path / "out" / "smsr_x2.ckpt"
    convert_official_checkpoint(str(src), str(dst), scale=2)
    checkpoint = torch.load(dst, map_location="cpu", weights_only=False)
    assert "hyper_parameters" not in checkpoint and checkpoint["effsr"]["structure"] == {}
    network = SMSR(**checkpoint["smsr_network"])
    network.load_state_dict({k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()})
    for key, value in state.items():
        assert torch.equal(network.state_dict()[key], value)
    assert network.pixel_range == 255.0
    with pytest.raises(CheckpointError, match="×2"):
        convert_official_checkpoint(str(src), str(tmp_path / "x4.ckpt"), scale=4)
    wrapped = tmp_path / "SMSR_x2_dataparallel.pt"
    torch.save({f"module.{key}": value for key, value in state.items()}, wrapped)
    convert_official_checkpoint(str(wrapped), str(tmp_path / "from_wrapped.ckpt"), scale=2)
    from_wrapped = torch.load(tmp_path / "from_wrapped.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(from_wrapped["state_dict"][key], value) for key, value in checkpoint["state_dict"].items())


@pytest.mark.unit
def test_converter_refuses_malicious_pickle(tmp_path: Path, code_pickle: CodePickle) -> None:
    src = tmp_path / "evil.pt"
    torch.save({"head.0.weight": torch.zeros(1), "payload": code_pickle}, src)
    with pytest.raises(CheckpointError, match="unpickling"):
        convert_official_checkpoint(str(src), str(tmp_path / "out.ckpt"), scale=2)
    assert not (tmp_path / "out.ckpt").exists() and not code_pickle.ran


RGB_MEAN = (0.4488, 0.4371, 0.4040)


def _official_layout_state_dict(scale: int, width: int = 64, modules: int = 5, layers: int = 4) -> dict:
    """A synthetic state_dict with the released SMSR key layout and shapes (methods.md §3), built without SMSR."""
    generator = torch.Generator().manual_seed(scale)
    quarter = width // 4

    def conv(out_channels: int, in_channels: int, kernel: int, bias: bool = True, gain: float = 1.0) -> dict:
        fan_in = in_channels * kernel * kernel
        weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) * gain / fan_in**0.5
        return {"weight": weight, **({"bias": torch.randn(out_channels, generator=generator) * 0.1} if bias else {})}

    def put(prefix: str, params: dict) -> None:
        state.update({f"{prefix}.{name}": value for name, value in params.items()})

    mean = torch.tensor(RGB_MEAN) * 255.0
    state: dict[str, torch.Tensor] = {
        "sub_mean.weight": torch.eye(3).view(3, 3, 1, 1), "sub_mean.bias": -mean,
    }
    put("head.0", conv(width, 3, 3))
    put("head.2", conv(width, width, 3))
    for k in range(modules):
        put(f"body.{k}.spa_mask.0", conv(quarter, width, 3))
        put(f"body.{k}.spa_mask.3", conv(quarter, quarter, 3))
        transposed = torch.randn(quarter, 2, 3, 3, generator=generator) / (9 * quarter) ** 0.5
        state.update({f"body.{k}.spa_mask.5.weight": transposed, f"body.{k}.spa_mask.5.bias": torch.zeros(2)})
        state[f"body.{k}.body.ch_mask"] = torch.randn(1, width, layers, 2, generator=generator)
        for i in range(layers):
            put(f"body.{k}.body.body.{i}", conv(width, width, 3, bias=False, gain=1.4))
        put(f"body.{k}.body.collect", conv(width, width * layers, 1))
        put(f"body.{k}.ca.conv_du.0", conv(width // 16, width, 1))
        put(f"body.{k}.ca.conv_du.2", conv(width, width // 16, 1))
    put("collect.0", conv(width, width * modules, 1))
    put("collect.2", conv(width, width, 3))
    put("tail.0", conv(3 * scale * scale, width, 3, gain=0.3))
    state.update({"add_mean.weight": torch.eye(3).view(3, 3, 1, 1), "add_mean.bias": mean.clone()})
    assert state["body.0.body.ch_mask"].shape == (1, width, layers, 2)
    assert state["body.4.body.body.3.weight"].shape == (width, width, 3, 3) if modules == 5 else True
    return state


@pytest.mark.e2e
def test_convert_official_then_effsr_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], code_pickle: CodePickle) -> None:
    """`effsr convert` of a legacy-format official state_dict, then `effsr test --config smsr_x2.yaml` on it."""
    from PIL import Image
    from skimage import data as skdata

    import effsr.cli as cli
    from effsr.metrics import psnr
    from effsr.ops.imresize import bicubic_degrade

    monkeypatch.chdir(tmp_path)
    state = _official_layout_state_dict(2)
    src = tmp_path / "SMSR_x2.pt"
    torch.save(state, src, _use_new_zipfile_serialization=False)
    assert cli.main(["convert", "--method", "smsr", "--scale", "2", str(src), "smsr_x2.ckpt"]) == 0
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    images = {"astronaut": skdata.astronaut()[100:150, 180:244], "coffee": skdata.coffee()[120:166, 200:258]}
    for name, image in images.items():
        Image.fromarray(image).save(hr_dir / f"{name}.png")
    config = Path(__file__).resolve().parents[1] / "experiments" / "smsr_x2.yaml"
    code = cli.main(["test", "--config", str(config), "--ckpt_path", "smsr_x2.ckpt", "--trainer.logger", "false",
                     "--trainer.default_root_dir", "run", "--data.test_sets", f"[{hr_dir}]",
                     "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    assert code == 0
    results = json.loads((tmp_path / "run" / "test_results.json").read_text())
    (row,) = results.values()
    assert row["n_images"] == 2 and row["macs_720p"] < row["macs_720p_dense"]
    network = SMSR(scale=2, pixel_range=255.0).eval()
    network.load_state_dict(state)
    with torch.no_grad():
        for name, image in images.items():
            hr, lr = bicubic_degrade(image, 2)
            lr_t = torch.from_numpy(lr).permute(2, 0, 1)[None].float()
            sr = (network.forward_hard(lr_t) / 255.0).clamp(0, 1)
            expected = float(psnr(sr, torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255, 2, True)[0])
            assert abs(row["images"][name]["psnr_y"] - expected) < 1e-3
    bad = torch.load("smsr_x2.ckpt", weights_only=True)
    module = smsr.SMSRModule(SMSR(scale=2, pixel_range=1.0))
    with pytest.raises(CheckpointError, match="pixel_range=255.0"):
        module.on_load_checkpoint(bad)
    evil = tmp_path / "evil.pt"
    torch.save({"head.0.weight": torch.zeros(1), "payload": code_pickle}, evil)
    capsys.readouterr()
    assert cli.main(["convert", "--method", "smsr", "--scale", "2", str(evil), "out.ckpt"]) == 2
    message = capsys.readouterr().err
    assert "arbitrary unpickling" in message and "refusing" in message
    assert not (tmp_path / "out.ckpt").exists() and not code_pickle.ran


@pytest.mark.e2e
def test_tiny_fit_then_test_reports_sparse_and_dense_macs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          assert_psnr_in_range: Callable[[float], None]) -> None:
    """The tiny config end to end. Which masks 40 steps learn differs between CPUs, so the sparse MACs are only
    bounded by the dense ones (equal at full masks); MACs below dense are forced in the tests above."""
    import effsr.cli as cli

    config = Path(__file__).resolve().parents[1] / "experiments" / "tiny" / "smsr_x2.yaml"
    monkeypatch.chdir(tmp_path)
    # An absolute W&B folder: wandb-core, started by an earlier test, resolves relative paths in its own cwd.
    save_dir = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs' / 'tiny_smsr_x2'}"
    assert cli.main(["fit", "--config", str(config), "--trainer.max_steps", "40", save_dir]) == 0
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    masks = [path for path in tmp_path.rglob("*.png") if "val_masks" in str(path)]
    assert masks, "the spatial-mask strip of a validation image must reach W&B"
    assert cli.main(["test", "--config", str(config), "--ckpt_path", str(checkpoints[-1])]) == 0
    results = json.loads(next(tmp_path.rglob("test_results.json")).read_text())
    assert list(results) == ["sample"]
    row = results["sample"]
    assert row["n_images"] == 3
    assert_psnr_in_range(row["psnr_y"])
    assert 0.0 <= row["spatial_density"] <= 1.0
    dense = analytic_macs_720p(SMSR(scale=2, num_features=16, num_modules=2), 1.0)[1]
    assert row["macs_720p_dense"] == dense and 0 < row["macs_720p"] <= dense


@pytest.mark.unit
def test_module_tau_schedule_loss_and_cost() -> None:
    module = smsr.SMSRModule(SMSR(scale=2, num_features=16, num_modules=2, pixel_range=255.0), sparsity_warmup_steps=10)
    module.set_schedule_value("tau", 0.7)
    assert module.network.tau == 0.7
    loss, logs = module.training_loss(torch.rand(2, 3, 12, 12) * 255, torch.rand(2, 3, 24, 24) * 255, {})
    assert torch.isfinite(loss) and "spatial_density_smm1" in logs and "dense_channels/smm1_layer3" in logs
    # Forced masks: every channel sparse, spatial mask on 7 of 15 rows. Then each layer of an SMM costs the
    # spatial density d times its dense 9·w² + w² (3×3 conv + 1×1 collect share) per pixel; the rest is dense.
    module.eval()
    with torch.no_grad():
        for smm in module.network.body:
            smm.body.ch_mask[..., 1] = 1.0
            smm.body.ch_mask[..., 0] = 0.0
    half = torch.zeros(1, 1, 15, 13)
    half[:, :, :7] = 1.0
    module.network.forced_spatial = [half, half]
    with torch.no_grad(), module.measuring() as measured:  # one evaluated image, as SRModule's evaluation does
        sr = module.infer(torch.rand(1, 3, 15, 13) * 255)
    image = module.image_measurements(measured, sr, sr)
    module.on_eval_measured("val", {}, module.set_measurements([image]), 1)
    report = module.cost_report()
    assert image["macs_720p"] == report["macs_720p"]
    density = 7 / 15
    assert report["spatial_density"] == pytest.approx(density)
    body_dense = 360 * 640 * 2 * 4 * (9 * 16 * 16 + 16 * 16)  # LR pixels at 720p ×2, SMMs, layers, per pixel
    assert report["macs_720p_dense"] - report["macs_720p"] == pytest.approx((1 - density) * body_dense, abs=2)
    constant = smsr.SMSRModule(SMSR(scale=2, num_features=16, num_modules=1), constant_tau=1.0)
    constant.set_schedule_value("tau", 0.5)
    assert constant.network.tau == 1.0


@pytest.mark.e2e
def test_benchmark_runs_on_official_state_dict_and_effsr_checkpoint(tmp_path: Path) -> None:
    """`benchmarks/smsr_inference.py --ckpt_path` takes an official .pt or a converted checkpoint, uses the
    network's own masks and scale, and ends with the speedup line."""
    import subprocess
    import sys

    from PIL import Image
    from skimage import data as skdata

    hr_dir = tmp_path / "Set"
    hr_dir.mkdir()
    Image.fromarray(skdata.astronaut()[100:148, 180:240]).save(hr_dir / "astronaut.png")
    Image.fromarray(skdata.coffee()[60:108, 200:248]).save(hr_dir / "coffee.png")
    state = _official_layout_state_dict(3, width=16, modules=2)
    official = tmp_path / "SMSR_x3.pt"
    torch.save(state, official, _use_new_zipfile_serialization=False)
    converted = tmp_path / "smsr_x3.ckpt"
    convert_official_checkpoint(str(official), str(converted), scale=3)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smsr_inference.py"
    for checkpoint in (official, converted):
        result = subprocess.run(
            [sys.executable, str(script), "--ckpt_path", str(checkpoint), "--hr-dir", str(hr_dir),
             "--repeats", "1", "--tiles", "8", "--threads", "1"],
            capture_output=True, text=True, timeout=300, check=True,
        )
        lines = result.stdout.strip().splitlines()
        assert lines[0].startswith("astronaut  lr=(16, 20)") and lines[1].startswith("coffee     lr=(16, 16)")
        errors = [float(item.split("=")[1]) for line in lines[:2] for item in line.split("max|x-hard|:")[1].split()]
        assert errors and max(errors) <= 1e-4
        speedup, macs_ratio = lines[-1].split()
        assert speedup.startswith("speedup_vs_dense=") and float(speedup.split("=")[1]) > 0
        assert macs_ratio.startswith("macs_ratio=") and float(macs_ratio.split("=")[1]) >= 1.0
