"""ASSL behaviours that follow the official code (MingSun-Tse/ASSL): SSA threshold gradient, free layers re-picked
after SSA, one optimizer state through the pruning stage, weight normalisation on every conv (docs/assl.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from effsr.archs import LEDSR
from effsr.cli_support import composed_yaml
from effsr.methods.assl import ASSLModule, WNConv2d, ssa_loss, top_indices
from effsr.phases import Phase, PhaseSchedule

REPO = Path(__file__).resolve().parents[1]


def tiny_module(**options: Any) -> ASSLModule:
    torch.manual_seed(0)
    return ASSLModule(LEDSR(2, num_features=8, num_blocks=2), prune_ratio=0.5, reg_interval=1, reg_step=0.1,
                      reg_limit=0.3, **options)


def ssa_gradient_by_hand(gammas: np.ndarray, num_pruned: int) -> np.ndarray:
    """d/dγ of −mean(S·Sᵀ), S_lc = σ(γ_lc − γ_l,b(l)), b(l) = the layer's smallest kept filter, in float64."""
    layers = gammas.shape[0]
    boundary = np.argsort(gammas, axis=1, kind="stable")[:, num_pruned]
    masks = 1.0 / (1.0 + np.exp(-(gammas - gammas[np.arange(layers), boundary][:, None])))
    column = masks.sum(axis=0)  # ∂(Σ_ab S_a·S_b)/∂S_lc = 2 Σ_b S_bc
    d_mask = -2.0 / layers**2 * column[None, :] * masks * (1.0 - masks)  # through γ_lc itself
    grad = d_mask.copy()
    grad[np.arange(layers), boundary] -= d_mask.sum(axis=1)  # through the threshold t_l = γ_l,b(l)
    return grad


@pytest.mark.unit
def test_ssa_threshold_gradient_lands_on_the_boundary_filter() -> None:
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(4, 16, generator=generator, dtype=torch.float64) + 0.05
    num_pruned = 11
    gammas = [nn.Parameter(row.clone()) for row in values]
    ssa_loss(gammas, num_pruned).backward()
    official = torch.stack([gamma.grad for gamma in gammas]).numpy()
    np.testing.assert_allclose(official, ssa_gradient_by_hand(values.numpy(), num_pruned), rtol=1e-10, atol=1e-14)

    boundary = values.argsort(dim=1, stable=True)[:, num_pruned]
    others = official.copy()
    others[np.arange(4), boundary.numpy()] = 0
    assert (np.abs(official[np.arange(4), boundary.numpy()]) > 3 * np.abs(others).max(axis=1)).all()

    detached = [nn.Parameter(row.clone()) for row in values]  # effsr's earlier form: no threshold gradient
    ssa_loss(detached, num_pruned, threshold="detached").backward()
    grads = torch.stack([gamma.grad for gamma in detached]).numpy()
    by_hand = ssa_gradient_by_hand(values.numpy(), num_pruned)
    kthvalue = values.sort(dim=1).values[:, num_pruned - 1 : num_pruned]
    masks = torch.sigmoid(values - kthvalue).numpy()
    expected = -2.0 / 16 * masks.sum(axis=0)[None, :] * masks * (1 - masks)
    np.testing.assert_allclose(grads, expected, rtol=1e-10, atol=1e-14)
    assert not np.allclose(grads, by_hand)


@pytest.mark.unit
@pytest.mark.parametrize("repick", [True, False])
def test_free_layers_are_repicked_when_ssa_ends(repick: bool) -> None:
    module = tiny_module(repick_after_ssa=repick)
    module.enter_phase("ssa", {})
    at_ssa_start = dict(module.plan)
    conv = module.network.get_submodule("blocks.0.conv1")
    kept = at_ssa_start["blocks.0.conv1"]
    with torch.no_grad():  # the filters kept at the start of ssa become the least important ones
        conv.gamma.copy_(torch.linspace(1.0, 2.0, 8))
        conv.gamma[kept] = torch.linspace(0.1, 0.4, len(kept))
    module.enter_phase("regularize", {})
    expected = top_indices(conv.gamma.detach().abs(), len(kept)) if repick else kept
    assert module.plan["blocks.0.conv1"] == expected
    assert set(expected).isdisjoint(kept) == repick
    assert module.plan["blocks.1.conv1"] == (
        top_indices(module.network.get_submodule("blocks.1.conv1").gamma.detach().abs(), len(kept)))
    assert "head" in module.plan


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(index)
        hr = torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8)
        return {"lr": hr[:, ::2, ::2].contiguous(), "hr": hr, "index": torch.tensor(index)}


class _AdamRecorder(lightning.Callback):
    """Records, after each step, the optimizer object and Adam's state of ``head.weight``."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, Tensor, float]] = {}

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        state = optimizer.state.get(pl_module.network.head.weight, {})
        exp_avg = state["exp_avg"].clone() if "exp_avg" in state else torch.zeros(0)
        self.seen[trainer.global_step] = (id(optimizer), exp_avg, float(state.get("step", 0)))


@pytest.mark.integration
@pytest.mark.parametrize("keep", [True, False])
def test_adam_state_is_kept_through_the_pruning_phases(keep: bool, tmp_path: Path) -> None:
    module = tiny_module(optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    settings = {"lr": 1e-3} if keep else {"lr": 1e-3, "keep_optimizer_state": False}
    schedule = PhaseSchedule([Phase("ssa", steps=2, settings={"lr": 1e-3}),
                              Phase("regularize", steps=2, settings=settings)])
    before, after = _AdamRecorder(), _AdamRecorder()  # callbacks run in order: before / after the phase switch
    trainer = lightning.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                callbacks=[before, schedule, after], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(_Images(), batch_size=2))
    old_id, old_exp_avg, old_step = before.seen[2]  # end of ssa, still its optimizer
    new_id, new_exp_avg, new_step = after.seen[2]  # right after regularize began (optimizer rebuilt: lr is set)
    assert module.phase_name == "regularize" and old_id != new_id and old_step == 2
    assert old_exp_avg.abs().sum() > 0
    if keep:
        torch.testing.assert_close(new_exp_avg, old_exp_avg, rtol=0, atol=0)
        assert new_step == 2 and after.seen[3][2] == 3
    else:
        assert new_exp_avg.numel() == 0 and after.seen[3][2] == 1


@pytest.mark.unit
@pytest.mark.parametrize("weight_norm", ["all", "pruned"])
def test_weight_norm_covers_every_conv_including_the_upsampler(weight_norm: str) -> None:
    module = tiny_module(weight_norm=weight_norm)
    lr = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        dense_output = module.network(lr)
    module.enter_phase("ssa", {})
    convs = {name: conv for name, conv in module.network.named_modules() if isinstance(conv, nn.Conv2d)}
    producers = {name for group in module.structure.groups for name in group.producers}
    assert "tail_conv" not in producers and set(convs) - producers == {"tail_conv"}
    assert isinstance(convs["tail_conv"], WNConv2d) == (weight_norm == "all")
    assert all(isinstance(convs[name], WNConv2d) for name in producers)
    with torch.no_grad():
        torch.testing.assert_close(module.network(lr), dense_output, atol=1e-5, rtol=0)

    state = module.structure_state()  # resuming in the WN stage rebuilds the same WN convs
    restored = tiny_module(weight_norm=weight_norm)
    restored.rebuild_structure(state)
    restored.load_state_dict(module.state_dict())

    module.enter_phase("finetune", {})
    tail = module.network.tail_conv
    assert type(tail) is nn.Conv2d and tail.out_channels == 3 * 2 * 2 and tail.in_channels == 4


@pytest.mark.unit
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_configs_use_the_official_lengths(scale: int) -> None:
    config = composed_yaml(REPO / f"experiments/assl_x{scale}.yaml")  # the per-scale file on its recipe
    phases = {phase["name"]: phase for phase in config["trainer"]["callbacks"][0]["init_args"]["phases"]}
    data = config["data"]
    iterations_per_epoch = -(-data["samples_per_epoch"] // data["batch_size"])  # the official DF2K epoch
    assert iterations_per_epoch == -(-3550 * (1000 // (3550 // 16)) // 16)  # EDSR's repeat = test_every // batches
    assert phases["ssa"]["steps"] == 17260
    assert config["model"]["init_args"]["lr_scheduler"]["init_args"]["step_size"] == 200 * iterations_per_epoch
    for name in ("regularize", "stabilize"):
        assert phases[name]["settings"].get("keep_optimizer_state", True)
