"""SLS N:M against the official search regime (JungHunOh/SLS_CVPR2022): cost per patch MAC, ratio annealing,
forward-only score clamp, re-ranking after N is frozen, the budget fill, the over-budget warning, the module's
own step counter and a search whose outcome (the expensive layer gets the smaller N) follows from the cost term."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F

from effsr.archs import MSRResNet
from effsr.cli_support import composed_yaml
from effsr.methods.nm_sparsity import NMConv2d, NMSparsityModule, fill_budget, patch_cost, sparse_cost_fraction

if TYPE_CHECKING:
    from conftest import CodePickle

REPO = Path(__file__).resolve().parents[1]
# Dense MACs per LR pixel of MSRResNet ×4, 32 features, 1 block (by hand): the two body convs 9·32·32 at LR,
# upconv1 9·32·128 at LR, upconv2 9·32·128 at 2× LR (4 LR-pixel equivalents), conv_hr 9·32·32 at 4× LR (16).
PER_LR_PIXEL = {"body.0.conv1": 9216, "body.0.conv2": 9216, "upconv1": 36864, "upconv2": 147456, "conv_hr": 147456}


def msrresnet_module(**options: object) -> NMSparsityModule:
    torch.manual_seed(0)
    return NMSparsityModule(MSRResNet(4, num_features=32, num_blocks=1, pixel_range=255.0), m=32, **options)


def batch(size: int = 2, lr_side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    hr = torch.rand(size, 3, 4 * lr_side, 4 * lr_side) * 255
    return F.avg_pool2d(hr, 4), hr


@pytest.mark.unit
def test_patch_mac_cost_is_per_image_and_the_fraction_form_is_its_exact_conversion() -> None:
    official = msrresnet_module(cost_unit="patch_macs", cost_weight=1e-10)
    lr, hr = batch(size=3, lr_side=8)
    official.network(lr)
    cost, dense = patch_cost(official.network)
    assert dense == sum(PER_LR_PIXEL.values()) * 8 * 8  # per image of the batch, as the official compute_costs
    assert {name: layer.image_macs() for name, layer in official.layers().items()} == {
        name: per_pixel * 64 for name, per_pixel in PER_LR_PIXEL.items()}
    assert float(cost.detach()) == pytest.approx(dense)  # N = M everywhere at the start
    # λ_fraction = λ_mac · Σ dense patch MACs gives the same loss and the same score gradients
    fraction = msrresnet_module(cost_unit="fraction", cost_weight=1e-10 * dense)
    fraction.load_state_dict(official.state_dict())
    gradients = []
    for module in (official, fraction):
        with torch.no_grad():
            for layer in module.layers().values():
                layer.scores.copy_(torch.linspace(1.0, 0.9, 31))
        torch.manual_seed(1)
        loss, _ = module.training_loss(lr, hr, {})
        loss.backward()
        gradients.append(torch.cat([layer.scores.grad for layer in module.layers().values()]))
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-12)


@pytest.mark.unit
def test_expensive_layers_end_with_smaller_n_under_the_official_regime() -> None:
    """Weights zero and frozen: the L1 loss gives the scores no gradient at all, and every score of every layer
    gets the same forced pull α (a stand-in for an equal L1 preference to keep units). The official cost term's
    gradient on a score is ∝ the layer's MACs, so under Adam a layer's scores fall iff its cost gradient exceeds α:
    with α = 2× the body convs' initial cost gradient, the 16× layers fall and the body convs stay at N = M (the
    4× upconv1 sits near the balance; the fill then spends the rest of the budget on its cheaper units)."""
    module = msrresnet_module(cost_unit="patch_macs", cost_weight=1e-10, budget=0.5, anneal_rule="ratio",
                              anneal_interval=1000, anneal_threshold=0.2, score_clamp="forward",
                              rerank_interval=1000, rerank_after_freeze=True)
    with torch.no_grad():
        for name, parameter in module.network.named_parameters():
            if not name.endswith("scores"):
                parameter.zero_()
                parameter.requires_grad_(False)
    module.enter_phase("search", {})
    optimizer = torch.optim.Adam(module.parameters_to_train(), lr=1e-3)  # one Adam group holds the scores
    lr, hr = batch(size=2, lr_side=8)
    module.network(lr)
    body = module.layers()["body.0.conv1"]
    alpha = 2 * 1e-10 * body.image_macs() / 32 * 31  # 2 × ∂cost/∂k_1 of a body conv at k = 1
    for _step in range(400):
        if module.phase_condition("budget_reached"):
            break
        loss, _ = module.training_loss(lr, hr, {})
        loss = loss - alpha * sum(layer.scores.sum() for layer in module.layers().values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert module.phase_condition("budget_reached")
    module.enter_phase("finetune", {})
    pattern = module.pattern()
    assert pattern["body.0.conv1"] == pattern["body.0.conv2"] == 32
    assert pattern["upconv2"] == pattern["conv_hr"] < 32  # the two 16× layers, pruned alike (equal MACs)
    assert pattern["upconv2"] < pattern["upconv1"] <= pattern["body.0.conv1"]  # the most expensive the hardest
    # frozen and filled: within one unit of the cheapest layer below the budget
    total = sum(PER_LR_PIXEL.values())
    cost = sum(PER_LR_PIXEL[name] * n / 32 for name, n in pattern.items()) / total
    assert module.cost_fraction() == pytest.approx(cost)
    assert 0.5 - min(PER_LR_PIXEL.values()) / 32 / total <= cost <= 0.5 + 1e-12


def make_layer(dense: int, scores: list[float], m: int = 4) -> NMConv2d:
    layer = NMConv2d.from_conv(torch.nn.Conv2d(8, 4, 1), m)
    layer.dense_macs.fill_(dense)
    with torch.no_grad():
        layer.scores.copy_(torch.tensor(scores))
    return layer


@pytest.mark.unit
def test_fill_budget_adds_the_unit_of_lowest_cost_per_keep_probability() -> None:
    # units: A costs 100/4 = 25, B 400/4 = 100; target 0.5·500 = 250, now 25 + 100 = 125.
    cheap, dear = make_layer(100, [0.4, 1.0, 1.0]), make_layer(400, [0.4, 1.0, 1.0])
    assert (cheap.n, dear.n) == (1, 1)
    # equal probabilities 0.4: A (25/0.4) thrice until N = M, then B (+100) would pass 250
    assert fill_budget([cheap, dear], 0.5) == {0: 4, 1: 1}
    # A's next unit ranks 0.1 (key 250), B's 0.45 (key 222): B first, then only A fits exactly
    cheap, dear = make_layer(100, [0.1, 1.0, 1.0]), make_layer(400, [0.45, 1.0, 1.0])
    assert fill_budget([cheap, dear], 0.5) == {0: 2, 1: 2}


@pytest.mark.unit
def test_search_ending_above_budget_warns_and_below_budget_is_filled() -> None:
    module = msrresnet_module(budget=0.25)
    with pytest.warns(UserWarning, match="above budget"):
        module.enter_phase("finetune", {})  # every N = M: the search ran out of steps
    assert set(module.pattern().values()) == {32}
    assert all(not layer.scores.requires_grad for layer in module.layers().values())
    filled = msrresnet_module(budget=0.25)
    with torch.no_grad():
        for layer in filled.layers().values():
            layer.scores.fill_(1.0)
            layer.scores[3] = 0.4  # N = 4 of 32 in every layer: 12.5 %, below budget
    assert filled.cost_fraction() == pytest.approx(0.125)
    filled.enter_phase("finetune", {})
    total = sum(PER_LR_PIXEL.values())
    assert 0.25 - 9216 / 32 / total <= filled.cost_fraction() <= 0.25


@pytest.mark.unit
def test_ratio_annealing_checks_the_compression_ratio_gain_every_second_record() -> None:
    module = msrresnet_module(anneal_rule="ratio", anneal_threshold=0.2, anneal_factor=1.2)
    module.anneal(1.0)  # ratio 1.0: first record of a pair, no check
    assert module.anneal_c == 1.0
    module.anneal(0.9)  # ratio 1.111: gained 0.111 < 0.2 → c × 1.2
    assert module.anneal_c == pytest.approx(1.2)
    module.anneal(0.5)
    module.anneal(0.4)  # ratio 2.0 → 2.5: gained 0.5
    assert module.anneal_c == pytest.approx(1.2)
    module.anneal(0.4)
    module.anneal(0.39)  # 2.5 → 2.564: gained 0.064
    assert module.anneal_c == pytest.approx(1.44)


@pytest.mark.unit
def test_forward_clamp_leaves_scores_and_gives_none_outside_the_range_a_gradient() -> None:
    for clamp, stored in (("forward", 1.2), ("inplace", 1.03)):
        module = msrresnet_module(score_clamp=clamp)
        layer = module.layers()["upconv1"]
        with torch.no_grad():
            layer.scores[0] = 1.2
        module.before_step(1)
        assert float(layer.scores[0].detach()) == pytest.approx(stored)
    module = msrresnet_module(score_clamp="forward")
    layer = module.layers()["upconv1"]
    with torch.no_grad():
        layer.scores[0] = 1.2
    sparse_cost_fraction(module.network).backward()
    assert float(layer.scores.grad[0]) == 0.0 and bool((layer.scores.grad[1:] > 0).all())


@pytest.mark.unit
def test_reranking_continues_after_freeze_only_with_rerank_after_freeze() -> None:
    for keep_ranking, moves in ((True, True), (False, False)):
        module = msrresnet_module(rerank_interval=5, rerank_after_freeze=keep_ranking, fill_budget=False)
        module.enter_phase("search", {})
        with pytest.warns(UserWarning, match="above budget"):
            module.enter_phase("finetune", {})
        layer = module.layers()["upconv1"]
        layer.freeze(8)
        before = layer.rank.clone()
        with torch.no_grad():
            layer.weight.copy_(torch.flip(layer.weight, dims=[1]))  # reverses every group's order
        module.before_step(10)
        assert layer.n == 8
        assert (not torch.equal(layer.rank, before)) == moves


@pytest.mark.unit
def test_reranking_follows_the_modules_own_step_counter_outside_a_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = NMConv2d.rerank

    def counting(self: NMConv2d) -> None:
        calls.append(1)
        original(self)

    module = msrresnet_module(rerank_interval=20)
    monkeypatch.setattr(NMConv2d, "rerank", counting)
    lr, hr = batch(size=1, lr_side=8)
    for _ in range(10):
        module.training_loss(lr, hr, {})
    assert module.nm_step == 10
    assert len(calls) == len(module.layers())  # once (step 0), not at every step
    assert module.structure_state()["nm_step"] == 10


@pytest.mark.unit
@pytest.mark.parametrize("name", ["nm_carn_x2", "nm_carn_x3", "nm_carn_x4", "nm_edsr_baseline_x2",
                                  "nm_edsr_baseline_x3", "nm_edsr_baseline_x4"])
def test_paper_configs_carry_the_official_regime(name: str) -> None:
    config = composed_yaml(REPO / "experiments" / f"{name}.yaml")  # the per-scale file on its recipe
    options = config["model"]["init_args"]
    official = {"m": 32, "mode": "search", "cost_unit": "patch_macs", "cost_weight": 1e-10, "score_lr": None,
                "anneal_rule": "ratio", "anneal_threshold": 0.2, "anneal_factor": 1.2, "anneal_interval": 1000,
                "rerank_interval": 1000, "rerank_after_freeze": True, "score_clamp": "forward"}
    assert {key: options.get(key) for key in official} == official
    assert options["optimizer"]["init_args"]["lr"] == 1e-4
    assert options["lr_scheduler"]["init_args"] == {"milestones": [200000], "gamma": 0.5}
    assert config["trainer"]["max_steps"] == 300001  # 1 dense step (dense_checkpoint given) + 300k
    # 1000 iterations per epoch as the official --test_every 1000 at batch 16
    assert config["data"]["samples_per_epoch"] == 16000 and config["data"]["batch_size"] == 16


@pytest.mark.unit
def test_dense_and_member_files_are_read_safely_in_setup_not_in_init(tmp_path: Path, code_pickle: CodePickle) -> None:
    from effsr.errors import CheckpointError
    from effsr.methods.nm_adaptive import AdaptiveNMModule

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as file:
        pickle.dump({"state_dict": code_pickle}, file, protocol=2)
    sparse = msrresnet_module(dense_checkpoint=str(tmp_path / "missing.ckpt"))  # no I/O in __init__
    with pytest.raises(CheckpointError, match="dense_checkpoint .*missing.ckpt"):
        sparse.on_setup("fit")
    for path in (evil, tmp_path / "missing.ckpt"):
        adaptive = AdaptiveNMModule(MSRResNet(4, num_features=32, num_blocks=1), checkpoints=[None, str(path)], m=32)
        with pytest.raises(CheckpointError, match=r"checkpoints\[1\]"):
            adaptive.on_setup("fit")
    with pytest.raises(CheckpointError, match="refusing to load model.init_args.dense_checkpoint"):
        msrresnet_module(dense_checkpoint=str(evil)).on_setup("fit")
    assert not code_pickle.ran
    # a dense checkpoint loads into the N:M network and the ranks follow the loaded weights
    dense = MSRResNet(4, num_features=32, num_blocks=1, pixel_range=255.0)
    torch.save({"state_dict": {f"network.{key}": value for key, value in dense.state_dict().items()}},
               tmp_path / "dense.ckpt")
    started = msrresnet_module(dense_checkpoint=str(tmp_path / "dense.ckpt"))
    started.on_setup("fit")
    layer = started.layers()["upconv1"]
    assert torch.equal(layer.weight, dense.upconv1.weight)
    assert torch.equal(layer.rank, NMConv2d.from_conv(dense.upconv1, 32).rank)


@pytest.mark.unit
def test_adaptive_members_rebuild_from_the_checkpoint_without_their_files(tmp_path: Path) -> None:
    from effsr.methods.nm_adaptive import AdaptiveNMModule

    paths = []
    for index, budget in enumerate((1.0, 0.25)):
        member = msrresnet_module(mode="oneshot", budget=budget)
        checkpoint: dict = {"state_dict": member.state_dict()}
        member.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, tmp_path / f"member{index}.ckpt")
        paths.append(str(tmp_path / f"member{index}.ckpt"))
    backbone = MSRResNet(4, num_features=32, num_blocks=1, pixel_range=255.0)
    trained = AdaptiveNMModule(backbone, checkpoints=paths, m=32, patch_size=8, overlap=2)
    trained.on_setup("fit")
    saved: dict = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(saved)
    for path in paths:
        Path(path).unlink()  # e.g. testing on another machine: the checkpoint holds everything
    fresh = AdaptiveNMModule(backbone, checkpoints=paths, m=32, patch_size=8, overlap=2)
    fresh.on_load_checkpoint(saved)
    fresh.load_state_dict(saved["state_dict"])
    assert torch.equal(fresh.ensemble.costs, trained.ensemble.costs) and float(fresh.ensemble.costs[1]) < 0.5
    lr = torch.rand(1, 3, 8, 8) * 255
    for ours, theirs in zip(fresh.ensemble.members, trained.ensemble.members, strict=True):
        assert torch.equal(ours(lr), theirs(lr))


@pytest.mark.integration
def test_configs_instantiate_without_their_files_and_the_old_class_path_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import effsr.cli
    from effsr.cli import EffSRCLI
    from effsr.methods.nm_adaptive import AdaptiveNMModule

    # the CLI names missing member files before instantiating (its own check); the module itself reads none
    monkeypatch.setattr(effsr.cli, "check_checkpoint_paths", lambda *_args: None)
    model = EffSRCLI(args=["--config", str(REPO / "experiments" / "nm_adaptive_x4.yaml"), "--trainer.logger=false"],
                     run=False).model
    assert isinstance(model, AdaptiveNMModule) and not any(Path(p).exists() for p in model.checkpoints if p)
    old = (REPO / "experiments" / "tiny" / "nm_adaptive_x4.yaml").read_text().replace(
        "effsr.methods.nm_adaptive.AdaptiveNMModule", "effsr.methods.nm_sparsity.AdaptiveNMModule")
    (tmp_path / "config.yaml").write_text(old)
    model = EffSRCLI(args=["--config", str(tmp_path / "config.yaml"), "--trainer.logger=false"], run=False).model
    assert isinstance(model, AdaptiveNMModule)
