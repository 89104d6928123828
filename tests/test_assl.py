"""ASSL: weight-norm identity, channel analysis, plans, SSA/growing L2, pruning equality, checkpoints, CLI."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from effsr.archs import EDSR, LEDSR
from effsr.methods.assl import (
    ASSLModule,
    FusedConv2d,
    GrowingL2,
    WNConv2d,
    analyze_channels,
    compute_plan,
    conv_shapes,
    convert_to_weight_norm,
    deploy_network,
    mask_network,
    num_kept,
    prune_network,
    pruned_indices,
    ssa_loss,
)
from effsr.phases import Phase, PhaseSchedule

REPO = Path(__file__).resolve().parents[1]


def small_ledsr(scale: int = 2, features: int = 16, blocks: int = 3) -> LEDSR:
    torch.manual_seed(0)
    return LEDSR(scale, num_features=features, num_blocks=blocks)


def randomise_gammas(network: nn.Module) -> None:
    """Gives every WN layer distinct, random filter scales (and biases) so pruning choices matter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, WNConv2d):
                module.gamma.mul_(torch.rand(module.gamma.shape, generator=generator) * 2)
                module.bias.add_(torch.randn(module.bias.shape, generator=generator) * 0.1)


@pytest.mark.unit
def test_analysis_matches_ledsr_declaration() -> None:
    network = small_ledsr(blocks=4)
    structure = analyze_channels(network)
    declared = network.prunable_layers()
    assert [group.producers for group in structure.constrained] == [declared["constrained"]]
    assert [group.producers[0] for group in structure.free] == declared["free"]
    assert structure.fixed == declared["input_only"]
    assert "tail_conv" in structure.constrained[0].consumers
    assert all(group.consumers == [group.key.replace("conv1", "conv2")] for group in structure.free)


@pytest.mark.unit
def test_analysis_never_prunes_convs_feeding_pixel_shuffle() -> None:
    torch.manual_seed(0)
    structure = analyze_channels(EDSR(4, num_features=8, num_blocks=2))
    assert {"upsampler.0", "upsampler.2", "tail"} <= set(structure.fixed)
    assert structure.constrained[0].consumers[-1] == "upsampler.0"
    assert analyze_channels(EDSR(4, num_features=8, num_blocks=2), skip_layers=["blocks.0.*"]).free[0].key == (
        "blocks.1.conv1")


@pytest.mark.unit
def test_weight_norm_identity() -> None:
    network = small_ledsr()
    lr = torch.rand(2, 3, 12, 10)
    dense_output = network(lr)
    structure = analyze_channels(network)
    convert_to_weight_norm(network, [name for group in structure.groups for name in group.producers])
    wn_layers = [module for module in network.modules() if isinstance(module, WNConv2d)]
    assert len(wn_layers) == 2 * 3 + 2
    torch.testing.assert_close(wn_layers[0].gamma, wn_layers[0].weight.flatten(1).norm(dim=1))
    torch.testing.assert_close(network(lr), dense_output, atol=1e-6, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize(("channels", "ratio", "keep", "multiple", "expected"), [
    (256, 0.80859375, None, None, 49), (256, None, 49, None, 49), (256, 0.80859375, None, 8, 48),
    (256, 0.80859375, None, 16, 48), (256, None, 52, 8, 56), (4, 0.99, None, None, 1), (16, 0.5, None, None, 8),
    (10, 0.25, None, None, 7), (8, None, 100, None, 8), (8, None, 3, 16, 8),
])
def test_num_kept(channels: int, ratio: float | None, keep: int | None, multiple: int | None, expected: int) -> None:
    assert num_kept(channels, ratio, keep, multiple) == expected


@pytest.mark.unit
def test_constrained_ranking_first_or_sum() -> None:
    network = small_ledsr(features=8, blocks=2)
    structure = analyze_channels(network)
    group = structure.constrained[0]
    with torch.no_grad():
        for index, name in enumerate(group.producers):
            weight = network.get_submodule(name).weight
            weight.mul_(1e-3)
            weight[index] *= 1e4
    assert compute_plan(network, structure, keep=1, ranking="first")["head"] == [0]
    assert compute_plan(network, structure, keep=4, ranking="sum")["head"] == [0, 1, 2, 3]


@pytest.mark.unit
@pytest.mark.parametrize("architecture", ["ledsr", "edsr"])
def test_pruned_equals_masked(architecture: str) -> None:
    torch.manual_seed(0)
    network = (LEDSR(3, num_features=16, num_blocks=3) if architecture == "ledsr"
               else EDSR(2, num_features=16, num_blocks=2))
    structure = analyze_channels(network)
    convert_to_weight_norm(network, [name for group in structure.groups for name in group.producers])
    randomise_gammas(network)
    plan = compute_plan(network, structure, ratio=0.6)
    assert {len(kept) for kept in plan.values()} == {6}
    compact = prune_network(network, structure, plan)
    masked = copy.deepcopy(network)
    mask_network(masked, structure, plan)
    lr = torch.rand(2, 3, 11, 9)
    with torch.no_grad():
        difference = (compact(lr) - masked(lr)).abs().max().item()
        assert (masked(lr) - network(lr)).abs().max().item() > 1e-3
    assert difference <= 1e-5
    assert not any(isinstance(module, WNConv2d) for module in compact.modules())
    assert compact.head.weight.shape == (6, 3, 3, 3)
    assert compact.blocks[0].conv1.weight.shape == (6, 6, 3, 3)
    if architecture == "ledsr":
        assert compact.tail_conv.weight.shape == (27, 6, 3, 3)
    else:
        assert compact.upsampler[0].weight.shape == (64, 6, 3, 3)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in network.parameters()) / 2


@pytest.mark.unit
@pytest.mark.parametrize("architecture", ["ledsr", "edsr"])
def test_deploy_network_folds_and_fuses_without_changing_the_output(architecture: str) -> None:
    torch.manual_seed(0)
    network = (LEDSR(4, num_features=16, num_blocks=3, res_scale=0.5, pixel_range=255.0) if architecture == "ledsr"
               else EDSR(2, num_features=16, num_blocks=2, res_scale=0.1, pixel_range=255.0)).eval()
    structure = analyze_channels(network)
    compact = prune_network(network, structure, compute_plan(network, structure, keep=5)).eval()
    deployed = deploy_network(compact)
    lr = torch.rand(2, 3, 11, 9) * 255.0
    with torch.inference_mode():
        assert (deployed(lr) - compact(lr)).abs().max().item() <= 1e-3
    with torch.no_grad():
        assert (deployed(lr) - compact(lr)).abs().max().item() <= 1e-3
    convs = [module for module in deployed.modules() if isinstance(module, nn.Conv2d | FusedConv2d)]
    assert all(isinstance(module, FusedConv2d) for module in convs)
    assert sum(module.relu for module in convs) == len(network.blocks)
    code = deployed.code
    assert "relu" not in code and "mul" not in code and " + " not in code.split("head")[-1]


@pytest.mark.unit
def test_growing_l2_schedule_values() -> None:
    growth = GrowingL2(interval=20, step=1e-4, limit=5e-4)
    assert growth.alpha("a", 100) == 0.0
    growth.start("a", 100)
    growth.start("a", 150)
    assert growth.alpha("a", 118) == 0.0
    assert growth.alpha("a", 119) == pytest.approx(1e-4)
    assert growth.alpha("a", 159) == pytest.approx(3e-4)
    assert growth.alpha("a", 100 + 20 * 40) == pytest.approx(5e-4)
    assert growth.reached(["a"], 199)
    assert not growth.reached(["a"], 198)
    growth.start("b", 150)
    growth.freeze(190)
    assert growth.alpha("b", 10_000) == pytest.approx(2e-4)
    assert growth.alpha("a", 10_000) == pytest.approx(4e-4)
    restored = GrowingL2(interval=20, step=1e-4, limit=5e-4)
    restored.load(growth.state())
    assert restored.alpha("b", 500) == growth.alpha("b", 500)


@pytest.mark.unit
@pytest.mark.parametrize("threshold", ["kept", "detached"])
def test_ssa_loss_rewards_alignment(threshold: str) -> None:
    base = torch.linspace(0.1, 1.0, 8)
    aligned = ssa_loss([base, base.clone(), base.clone()], num_pruned=4, threshold=threshold)
    misaligned = ssa_loss([base, base.flip(0), base.roll(3)], num_pruned=4, threshold=threshold)
    assert aligned < misaligned
    # Its gradient at an undecided layer (γ ≈ 0.5) raises γ more where the decided layer keeps its filters
    # (4..7) than where it prunes them (0..3): descent aligns the layers. (The "kept" form's boundary filter
    # carries the threshold's gradient, the sum of the others' with the opposite sign.)
    undecided = (0.5 + 0.01 * torch.randn(8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    ssa_loss([base, undecided], num_pruned=4, threshold=threshold).backward()
    ascent = -undecided.grad
    boundary = int(torch.argsort(undecided.detach(), stable=True)[4]) if threshold == "kept" else -1
    kept = [ascent[i] for i in range(4, 8) if i != boundary]
    pruned = [ascent[i] for i in range(4) if i != boundary]
    assert min(kept) > max(pruned) > 0
    if threshold == "kept":
        assert ascent[boundary] == pytest.approx(-(ascent.sum() - ascent[boundary]).item(), rel=1e-5)


def make_module(**options: object) -> ASSLModule:
    return ASSLModule(small_ledsr(features=16, blocks=2), prune_ratio=0.5, reg_interval=2, reg_step=0.1,
                      reg_limit=0.3, **options)


@pytest.mark.unit
def test_module_phases_penalty_and_condition() -> None:
    module = make_module()
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    assert module.enter_phase("ssa", {}) is True
    assert module.stage == "wn" and set(module.plan) == {"blocks.0.conv1", "blocks.1.conv1"}
    loss, logs = module.training_loss(lr, hr, {})
    assert "ssa" in logs and logs["reg_alpha"] == 0.0
    module.enter_phase("regularize", {})
    assert set(module.plan) == {"head", "blocks.0.conv1", "blocks.1.conv1"}
    assert not module.phase_condition("reg_limit_reached")
    module.growth.starts = {key: -10 for key in module.growth.starts}
    assert module.phase_condition("reg_limit_reached")
    loss, logs = module.training_loss(lr, hr, {})
    assert "ssa" not in logs and logs["reg_alpha"] == pytest.approx(0.3)
    module.network.zero_grad()
    module._reg_term()[0].backward()
    head = module.network.head
    kept = module.plan["head"]
    assert head.gamma.grad[kept].abs().sum() == 0
    assert head.gamma.grad[pruned_indices(16, kept)].abs().sum() > 0
    assert module.enter_phase("finetune", {}) is True
    assert module.stage == "compact" and module.network.head.out_channels == 8
    assert set(module.kept_widths().values()) == {8} and len(module.kept_widths()) == 6
    with pytest.raises(Exception, match="after pruning"):
        module.enter_phase("regularize", {})


@pytest.mark.unit
@pytest.mark.parametrize("stage_phases", [["ssa"], ["ssa", "regularize", "prune"]])
def test_plan_round_trip_through_checkpoint(stage_phases: list[str], tmp_path: Path) -> None:
    module = make_module(keep=5, keep_multiple_of=None)
    for phase in stage_phases:
        module.enter_phase(phase, {})
    randomise_gammas(module.network)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "assl.ckpt")
    loaded = torch.load(tmp_path / "assl.ckpt", weights_only=True)
    fresh = make_module(keep=5)
    fresh.on_load_checkpoint(loaded)
    fresh.load_state_dict(loaded["state_dict"], strict=True)
    assert fresh.stage == module.stage and fresh.plan == module.plan
    assert fresh.growth.state() == module.growth.state()
    lr = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(fresh.network(lr), module.network(lr), atol=1e-6, rtol=0)
    if module.stage == "compact":
        assert fresh.network.blocks[1].conv2.weight.shape == (5, 5, 3, 3)
        assert fresh.cost_report()["params"] < make_module().cost_report()["params"] / 3


def _phase_trainer(root: Path) -> tuple[lightning.Trainer, PhaseSchedule]:
    schedule = PhaseSchedule([
        Phase("dense", steps=3, settings={"lr": 1e-3}), Phase("ssa", steps=3),
        Phase("regularize", until="reg_limit_reached", max_steps=20), Phase("stabilize", steps=3),
        Phase("prune", steps=0), Phase("finetune", steps=5),
    ])
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = lightning.Trainer(max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                default_root_dir=root, callbacks=[schedule, checkpoints])
    return trainer, schedule


def _trainer_module() -> ASSLModule:
    torch.manual_seed(0)
    return ASSLModule(LEDSR(2, num_features=16, num_blocks=2, pixel_range=255.0), prune_ratio=0.5,
                      reg_interval=1, reg_step=0.1, reg_limit=0.3)


@pytest.mark.integration
def test_trainer_runs_all_phases_and_resumes_in_wn_and_compact_stages(
        tmp_path: Path, random_patches: Callable[[int], torch.utils.data.Dataset]) -> None:
    loader = torch.utils.data.DataLoader(random_patches(64), batch_size=4)
    trainer, schedule = _phase_trainer(tmp_path / "run")
    module = _trainer_module()
    trainer.fit(module, loader)
    assert [name for name, _ in schedule.history] == ["dense", "ssa", "regularize", "stabilize", "prune",
                                                      "finetune"]
    assert dict(schedule.history)["stabilize"] == 8
    assert module.stage == "compact" and set(module.kept_widths().values()) == {8}
    for step, stage in ((9, "wn"), (15, "compact")):
        checkpoint_path = next((tmp_path / "run").glob(f"*step={step}.ckpt"))
        assert torch.load(checkpoint_path, weights_only=False)["effsr"]["structure"]["stage"] == stage
        resumed_trainer, resumed_schedule = _phase_trainer(tmp_path / f"resume{step}")
        resumed = _trainer_module()
        resumed_trainer.fit(resumed, loader, ckpt_path=str(checkpoint_path))
        assert resumed_trainer.global_step == trainer.global_step
        assert resumed.stage == "compact" and resumed_schedule.history == schedule.history
        assert conv_shapes(resumed.network) == conv_shapes(module.network)


@pytest.mark.e2e
def test_tiny_config_runs_every_phase_then_test_and_profile(tmp_path: Path, no_wandb_credentials: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            assert_psnr_in_range: Callable[[float], None]) -> None:
    from effsr.cli import main

    fused_stages: list[str] = []
    fused_network = ASSLModule._fused_network

    def spy(self: ASSLModule, lr: Tensor) -> nn.Module | None:
        network = fused_network(self, lr)
        if network is not None:
            fused_stages.append(self.stage)
        return network

    monkeypatch.setattr(ASSLModule, "_fused_network", spy)
    config = str(REPO / "experiments" / "tiny" / "assl_x2.yaml")
    root = tmp_path / "run"
    common = ["--config", config, "--trainer.default_root_dir", str(root),
              "--trainer.logger.init_args.save_dir", str(root)]
    assert main(["fit", *common]) == 0
    checkpoint_path = next(root.rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    structure = checkpoint["effsr"]["structure"]
    assert structure["stage"] == "compact"
    assert structure["shapes"]["head"] == [16, 3] and structure["shapes"]["tail_conv"] == [12, 16]
    schedule = next(state for key, state in checkpoint["callbacks"].items() if "PhaseSchedule" in key)
    assert [name for name, _ in schedule["history"]] == ["dense", "ssa", "regularize", "stabilize", "prune",
                                                         "finetune"]
    wandb_files = [path.read_bytes() for path in root.rglob("*.wandb")]
    for key in (b"assl/gamma_constrained", b"assl/gamma_free", b"reg_alpha", b"assl/kept_widths_mean"):
        assert any(key in content for content in wandb_files), key
    for chart in ("planned_widths", "kept_widths"):
        assert list(root.rglob(f"media/table/assl/{chart}_table_*.table.json")), chart
    validated_stages = set(fused_stages)
    fused_stages.clear()
    assert main(["test", *common, "--ckpt_path", str(checkpoint_path),
                 "--model.init_args.results_dir", str(root)]) == 0
    assert "compact" in validated_stages and set(fused_stages) == {"compact"}  # val and test ran fused
    results = json.loads((root / "test_results.json").read_text())
    dense_params = sum(p.numel() for p in LEDSR(2, num_features=32, num_blocks=2).parameters())
    assert_psnr_in_range(results["sample"]["psnr_y"])  # a learned level differs between CPUs
    assert results["sample"]["params"] < dense_params / 3
    report_path = tmp_path / "profile.json"
    assert main(["profile", "--config", config, "--ckpt_path", str(checkpoint_path), "--runs", "1",
                 "--lr_size", "32", "32", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["params"] == results["sample"]["params"]


def _eval_module(stage: str) -> ASSLModule:
    torch.manual_seed(0)
    module = ASSLModule(LEDSR(3, num_features=16, num_blocks=2, res_scale=0.5, pixel_range=255.0), keep=6)
    if stage != "dense":
        module.enter_phase("ssa", {})
        randomise_gammas(module.network)
    if stage == "compact":
        module.enter_phase("prune", {})
    assert module.stage == stage
    return module.eval()


@pytest.mark.unit
@pytest.mark.parametrize("stage", ["dense", "wn", "compact"])
def test_infer_uses_cached_fused_network_and_rebuilds_when_weights_change(stage: str) -> None:
    module = _eval_module(stage)
    lr = torch.rand(3, 3, 13, 11, generator=torch.Generator().manual_seed(2)) * 255.0
    tolerance = 1e-4 * module.pixel_range

    def check(context: Any) -> Tensor:
        with torch.no_grad():
            plain = module.network(lr)
        with context():
            fused = module.infer(lr)
        assert fused.shape == (3, 3, 39, 33) and fused.dtype == plain.dtype and fused.is_contiguous()
        assert (fused - plain).abs().max().item() <= tolerance
        return fused

    first = check(torch.inference_mode)
    cached = module._deploy_cache.network
    assert all(isinstance(m, FusedConv2d) for m in cached.modules() if isinstance(m, nn.Conv2d | FusedConv2d))
    assert not any(isinstance(m, WNConv2d) for m in cached.modules())
    check(torch.no_grad)
    assert module._deploy_cache.network is cached
    # an optimizer step
    parameters = [p for p in module.network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    module.network(lr[:1, :, :8, :8]).mean().backward()
    optimizer.step()
    second = check(torch.no_grad)
    assert module._deploy_cache.network is not cached and (second - first).abs().max().item() > 1e-3
    cached = module._deploy_cache.network
    # an in-place change that leaves the version counters alone (as fused Adam does, or `.data` edits)
    versions = [p._version for p in parameters]
    with torch.no_grad():
        for parameter in parameters:
            parameter.data.mul_(0.9)
    assert [p._version for p in parameters] == versions
    third = check(torch.inference_mode)
    assert module._deploy_cache.network is not cached and (third - second).abs().max().item() > 1e-3
    cached = module._deploy_cache.network
    # load_state_dict (in-place copies) back to other weights
    module.load_state_dict(_eval_module(stage).state_dict())
    torch.testing.assert_close(check(torch.inference_mode), first, atol=tolerance, rtol=0)
    assert module._deploy_cache.network is not cached
    # training mode, autograd or fused_inference=False: the plain network
    with torch.no_grad():
        plain = module.network(lr)
    module.train()
    with torch.no_grad():
        assert torch.equal(module.infer(lr), plain)
    module.eval()
    assert module.infer(lr).requires_grad
    module.fused_inference = False
    with torch.no_grad():
        assert torch.equal(module.infer(lr), plain)


@pytest.mark.unit
def test_infer_cache_follows_phase_change_and_pruning() -> None:
    module = _eval_module("wn")
    lr = torch.rand(2, 3, 9, 7) * 255.0
    with torch.inference_mode():
        module.infer(lr)
    assert module._deploy_cache is not None
    module.enter_phase("finetune", {})
    assert module._deploy_cache is None and module.stage == "compact"
    module.eval()
    with torch.inference_mode():
        fused = module.infer(lr)
        plain = module.network(lr)
    assert module._deploy_cache.network.head.weight.shape[0] == 6
    assert (fused - plain).abs().max().item() <= 1e-4 * 255.0


@pytest.mark.unit
def test_deploy_network_materialises_weight_norm_and_leaves_shared_convs_alone() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # old-style weight norm: deprecated, still used
                self.tail = torch.nn.utils.weight_norm(nn.Conv2d(8, 3, 3, padding=1))

        def forward(self, x: Tensor) -> Tensor:
            features = torch.relu(self.head(x))
            features = features + 0.5 * self.shared(features)
            features = features + 0.5 * self.shared(features)
            return self.tail(features)

    torch.manual_seed(0)
    network = Net().eval()
    with torch.no_grad():
        network.head.parametrizations.weight.original0.mul_(3.0)
        network.tail.weight_g.mul_(2.0)  # the hook's cached `weight` is stale until the next forward
    lr = torch.rand(2, 3, 7, 9)
    deployed = deploy_network(network)
    with torch.inference_mode():
        torch.testing.assert_close(deployed(lr), network(lr), atol=1e-5, rtol=0)
    assert isinstance(network.head.parametrizations.weight.original0, nn.Parameter)  # the original is untouched
    assert isinstance(deployed.head, FusedConv2d) and deployed.head.relu and isinstance(deployed.tail, FusedConv2d)
    assert type(deployed.shared) is nn.Conv2d
    assert torch.equal(deployed.shared.weight, network.shared.weight)
