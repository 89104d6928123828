"""ASSL ablation pieces (benchmarks/reproduce.py assl_x2): L1-norm criterion, re-initialised compact network,
the checkpoint saved right after the prune and the |γ| statistics recorded before it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
from torch import nn

from effsr.archs import LEDSR
from effsr.errors import ConfigError
from effsr.methods.assl import ASSLModule, WNConv2d, analyze_channels, conv_shapes, prune_network
from effsr.methods.assl.surgery import reinitialize
from effsr.phases import Phase, PhaseSchedule

FEATURES, KEEP = 8, 3
# per filter either a uniform magnitude on every tap (mean |W| = value, ‖W‖₂ = value·√fan_in) or one spike
# (mean |W| = value / fan_in, ‖W‖₂ = value), so that the two criteria keep different filters in every layer
_UNIFORM = {0: 0.020, 2: 0.030, 4: 0.015, 6: 0.025}
_SPIKE = {1: 0.36, 3: 0.38, 5: 0.32, 7: 0.30}
_DESIGNED = ("head", "blocks.0.conv1", "blocks.0.conv2", "body_conv")


def _designed_ledsr() -> LEDSR:
    """LEDSR F8 R1 whose pruned convs have the filter magnitudes above (signs alternate)."""
    torch.manual_seed(0)
    network = LEDSR(2, num_features=FEATURES, num_blocks=1)
    with torch.no_grad():
        for name in _DESIGNED:
            weight = network.get_submodule(name).weight
            weight.zero_()
            signs = torch.ones_like(weight[0]).flatten()
            signs[1::2] = -1
            for index, value in _UNIFORM.items():
                weight[index] = (signs * value).view_as(weight[index])
            for index, value in _SPIKE.items():
                weight[index].view(-1)[0] = -value
    return network


@pytest.mark.unit
@pytest.mark.parametrize(("criterion", "expected"), [
    ("l1_norm", [0, 2, 6]),  # the uniform filters: mean |W| 0.030 > 0.025 > 0.020 > 0.015 > every spike's
    ("scale", [1, 3, 5]),  # the spikes: ‖W‖₂ 0.38 > 0.36 > 0.32 > 0.30 > every uniform filter's
])
def test_prune_criterion_ranks_by_hand_computed_scores(criterion: str, expected: list[int]) -> None:
    for fan_in in (3 * 9, FEATURES * 9):  # the head's and the other convs'
        assert max(_UNIFORM.values()) * fan_in ** 0.5 < min(_SPIKE.values())
        assert max(_SPIKE.values()) / fan_in < min(_UNIFORM.values())
    module = ASSLModule(_designed_ledsr(), keep=KEEP, prune_criterion=criterion)  # type: ignore[arg-type]
    module.enter_phase("prune", {})
    # free layer and constrained group (ranked by its first layer, the head) alike
    assert module.plan == {"head": expected, "blocks.0.conv1": expected}
    assert module.network.head.out_channels == KEEP


@pytest.mark.unit
def test_l1_norm_constrained_group_follows_its_first_layer_or_the_sum() -> None:
    network = _designed_ledsr()
    with torch.no_grad():  # the later producers rank the other way round
        for name in ("blocks.0.conv2", "body_conv"):
            weight = network.get_submodule(name).weight
            weight.copy_(weight.flip(0))
    producers = [network.get_submodule(name).weight.abs().mean(dim=(1, 2, 3)) for name in
                 ("head", "blocks.0.conv2", "body_conv")]
    by_sum = sorted(torch.stack(producers).sum(0).argsort(descending=True)[:KEEP].tolist())
    assert by_sum != [0, 2, 6]
    first = ASSLModule(network, keep=KEEP, prune_criterion="l1_norm")
    summed = ASSLModule(_designed_ledsr(), keep=KEEP, prune_criterion="l1_norm", constrained_ranking="sum")
    summed.network.load_state_dict(network.state_dict())
    first.enter_phase("prune", {})
    summed.enter_phase("prune", {})
    assert first.plan["head"] == [0, 2, 6] and summed.plan["head"] == by_sum


@pytest.mark.unit
def test_unknown_prune_criterion_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="prune_criterion"):
        ASSLModule(_designed_ledsr(), keep=KEEP, prune_criterion="random")  # type: ignore[arg-type]


@pytest.mark.unit
def test_reinitialize_equals_a_fresh_init_of_the_compact_shapes() -> None:
    torch.manual_seed(1)
    network = LEDSR(2, num_features=16, num_blocks=2)
    structure = analyze_channels(network)
    plan = {group.key: list(range(0, 16, 4)) for group in structure.groups}
    compact = prune_network(network, structure, plan)
    torch.manual_seed(7)
    reinitialize(compact)
    torch.manual_seed(7)  # nn.Conv2d's constructor draws exactly what reset_parameters() draws
    fresh = {name: nn.Conv2d(shape[1], shape[0], 3, padding=1) for name, shape in conv_shapes(compact).items()}
    for name, conv in fresh.items():
        torch.testing.assert_close(compact.get_submodule(name).weight, conv.weight, rtol=0, atol=0)
        torch.testing.assert_close(compact.get_submodule(name).bias, conv.bias, rtol=0, atol=0)


@pytest.mark.unit
def test_reinit_after_prune_replaces_the_slice_by_an_init_at_the_compact_fan_in() -> None:
    torch.manual_seed(1)
    network = LEDSR(2, num_features=16, num_blocks=2)
    sliced = ASSLModule(network, keep=4, save_pruned=False)
    reinit = ASSLModule(LEDSR(2, num_features=16, num_blocks=2), keep=4, reinit_after_prune=True)
    reinit.network.load_state_dict(network.state_dict())
    sliced.enter_phase("prune", {})
    reinit.enter_phase("prune", {})
    assert conv_shapes(reinit.network) == conv_shapes(sliced.network)
    conv = reinit.network.blocks[0].conv2  # 4 → 4 channels: default init bound 1/√(4·9)
    bound = 1 / (conv.in_channels * 9) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    # the slice of the dense conv (fan-in 144, bound 1/12) cannot reach that bound (1/6)
    assert sliced.network.blocks[0].conv2.weight.abs().max() <= 1 / 12 + 1e-6 < 0.8 * bound
    assert not torch.equal(reinit.network.head.weight, sliced.network.head.weight)


@pytest.mark.unit
def test_prune_stats_record_kept_and_pruned_scales_before_the_prune() -> None:
    torch.manual_seed(0)
    module = ASSLModule(LEDSR(2, num_features=FEATURES, num_blocks=1), keep=2, save_pruned=False)
    module.enter_phase("ssa", {})
    gammas = torch.tensor([4.0, 0.1, 0.2, 3.0, 0.3, 0.0, 0.1, 0.2])  # kept: 0 and 3
    with torch.no_grad():
        for module_ in module.network.modules():
            if isinstance(module_, WNConv2d) and module_.out_channels == FEATURES:
                module_.gamma.copy_(gammas)
    module.enter_phase("regularize", {})
    module.enter_phase("prune", {})
    stats = module.prune_stats["blocks.0.conv1"]
    assert module.plan["blocks.0.conv1"] == [0, 3]
    assert stats["kept_mean"] == pytest.approx(3.5)
    assert stats["pruned_mean"] == pytest.approx(0.9 / 6)
    assert stats["pruned_max_over_kept_min"] == pytest.approx(0.3 / 3.0)
    assert set(module.prune_stats) == {"head", "blocks.0.conv1"}
    assert module.structure_state()["prune_stats"] == module.prune_stats


@pytest.mark.integration
def test_pruned_checkpoint_is_the_compact_model_before_finetuning(
        tmp_path: Path, random_patches: Callable[[int], torch.utils.data.Dataset]) -> None:
    torch.manual_seed(0)
    dense = LEDSR(2, num_features=FEATURES, num_blocks=1, pixel_range=255.0)
    module = ASSLModule(LEDSR(2, num_features=FEATURES, num_blocks=1, pixel_range=255.0), keep=KEEP,
                        prune_criterion="l1_norm")
    module.network.load_state_dict(dense.state_dict())
    (tmp_path / "config.yaml").write_text("# the run's config\n")
    schedule = PhaseSchedule([Phase("prune", steps=0), Phase("finetune", steps=3, settings={"lr": 1e-2})])
    trainer = lightning.Trainer(max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[schedule])
    trainer.fit(module, torch.utils.data.DataLoader(random_patches(16), batch_size=4))
    saved = torch.load(tmp_path / "pruned" / "pruned.ckpt", weights_only=False)
    assert (tmp_path / "pruned" / "config.yaml").read_text() == "# the run's config\n"
    assert saved["global_step"] == 0 and saved["effsr"]["structure"]["stage"] == "compact"
    structure = analyze_channels(dense)
    expected = prune_network(dense, structure, saved["effsr"]["structure"]["plan"])
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][f"network.{name}"], tensor, rtol=0, atol=1e-7)
    assert not torch.equal(module.network.head.weight, expected.head.weight)  # finetuned after the save
