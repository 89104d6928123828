"""Tests for ClassSR: classifier, losses (global-batch L_avg under DDP), split cache, routed inference, the
tiny five-phase pipeline through the CLI and the split + classifier phases under 2-process gloo DDP."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from bounded_run import run_bounded

from effsr.distributed import gather_with_grad
from effsr.errors import CheckpointError, ConfigError
from effsr.methods.classsr import (
    Classifier,
    ClassSRModule,
    ClassSRNet,
    average_loss,
    class_loss,
    split_by_score,
)


@pytest.mark.unit
def test_classifier_outputs_logits_per_patch() -> None:
    logits = Classifier(num_classes=3)(torch.rand(5, 3, 32, 32))
    assert logits.shape == (5, 3)


@pytest.mark.unit
def test_losses_prefer_one_hot_and_balance() -> None:
    one_hot = torch.eye(3)
    uniform = torch.full((3, 3), 1 / 3)
    assert class_loss(one_hot) < class_loss(uniform)
    assert torch.isclose(average_loss(one_hot), torch.tensor(0.0))
    assert average_loss(torch.tensor([[1.0, 0, 0]] * 3)) > 0


def _worker(rank: int, store: str, probabilities: torch.Tensor, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    local = probabilities.chunk(2)[rank].clone().requires_grad_(True)
    loss = average_loss(gather_with_grad(local))
    loss.backward()
    results[rank] = (loss.item(), local.grad.clone())
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_average_loss_uses_global_batch_under_ddp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(8, 3), dim=1)
    results = mp.Manager().dict()
    # A file rendezvous: no TCP port that another test or user on the machine could take in between.
    mp.spawn(_worker, args=(str(tmp_path / "store"), probabilities, results), nprocs=2, join=True)
    reference = probabilities.clone().requires_grad_(True)
    expected = average_loss(reference)
    expected.backward()
    for rank in range(2):
        assert abs(results[rank][0] - expected.item()) < 1e-5
        # all_gather's backward sums the grads of both ranks' (identical) losses; DDP's averaging then halves
        # them, so the parameter update equals the single-process one on the concatenated batch.
        assert torch.allclose(results[rank][1] / 2, reference.grad.chunk(2)[rank], atol=1e-6)


@pytest.mark.unit
def test_phases_select_trainable_parameters() -> None:
    from effsr.archs import FSRCNN
    from effsr.methods.classsr import ClassSRModule, ClassSRNet

    net = ClassSRNet(branches=[FSRCNN(scale=4, num_features=n) for n in (16, 36, 56)])
    module = ClassSRModule(network=net)
    lr = torch.rand(2, 3, 32, 32)
    sr, probabilities = net.mixture(lr)
    assert sr.shape == (2, 3, 128, 128) and torch.allclose(probabilities.sum(1), torch.ones(2))
    assert torch.equal(net(lr), sr)  # the backbone contract: forward gives the SR tensor
    assert module.on_phase_start("classifier", {})
    assert all(p.requires_grad for p in net.classifier.parameters())
    assert not any(p.requires_grad for p in net.branches.parameters())


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny" / "classsr_x4.yaml"


@pytest.mark.unit
def test_branches_checkpoint_starts_the_fit_from_trained_branches_and_their_split(tmp_path: Path) -> None:
    """``branches_checkpoint``: the first phase of a fresh fit loads every branch and the split of a ClassSR
    checkpoint (a classifier-only schedule on trained branches); a checkpoint without branches is a clear error."""
    trained = _tiny_module()
    with torch.no_grad():
        for parameter in trained.network.branches.parameters():
            parameter.add_(0.5)
    trained.split_thresholds = [31.5, 26.0]
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"network.{key}": value for key, value in trained.network.state_dict().items()},
                "effsr": {"structure": trained.structure_state()}}, path)
    module = _tiny_module(branches_checkpoint=str(path))
    classifier_before = {key: value.clone() for key, value in module.network.classifier.state_dict().items()}
    assert module.on_phase_start("classifier", {})
    for key, value in trained.network.branches.state_dict().items():
        assert torch.equal(module.network.branches.state_dict()[key], value)
    for key, value in module.network.classifier.state_dict().items():  # only the branches are loaded
        assert torch.equal(value, classifier_before[key])
    assert module.split_thresholds == [31.5, 26.0]
    with torch.no_grad():  # loaded once: a later phase start keeps what training changed
        next(module.network.branches.parameters()).add_(1.0)
    changed = next(module.network.branches.parameters()).clone()
    module.on_phase_start("joint", {})
    assert torch.equal(next(module.network.branches.parameters()), changed)
    backbone = tmp_path / "backbone.ckpt"
    torch.save({"state_dict": {f"network.{key}": value for key, value in
                               trained.network.branches[0].state_dict().items()}}, backbone)
    with pytest.raises(CheckpointError, match="branches_checkpoint"):
        _tiny_module(branches_checkpoint=str(backbone)).on_phase_start("classifier", {})


def _tiny_module(**kwargs: object) -> ClassSRModule:
    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.FSRCNN", widths=[4, 6, 8], scale=4,
                         backbone_args={"shrink_features": 4, "num_mapping": 1})
    return ClassSRModule(network=network, **kwargs)


@pytest.mark.unit
def test_split_by_score_equal_classes_descending_thresholds() -> None:
    scores = np.array([30.0, 40.0, 20.0, 35.0, 25.0, np.inf, 22.0, 31.0])
    labels, thresholds = split_by_score(scores, 3)
    assert np.bincount(labels).tolist() == [3, 3, 2]
    assert set(np.nonzero(labels == 0)[0]) == {1, 3, 5}          # highest PSNR -> simplest -> narrow branch
    assert set(np.nonzero(labels == 2)[0]) == {2, 6}
    assert thresholds == [pytest.approx(33.0), pytest.approx(23.5)]


@pytest.mark.unit
def test_split_is_cached_reused_and_invalidated_by_new_weights(tmp_path: Path, photo_folder: Path) -> None:
    from effsr.data import SRDataModule

    datamodule = SRDataModule(scale=4, train=str(photo_folder), train_crop="grid",
                              hr_subimage_size=128, hr_subimage_step=64, num_workers=0, val_sets=[],
                              cache_dir=str(tmp_path / "cache"))
    module = _tiny_module(split_cache_dir=str(tmp_path / "splits"))
    first = module.compute_split(datamodule)
    assert not first["cached"] and first["num_subimages"] == 18 and first["class_sizes"] == [6, 6, 6]
    assert first["thresholds"][0] > first["thresholds"][1]
    labels = module.split_labels.clone()
    second = module.compute_split(datamodule)
    assert second["cached"] and second["path"] == first["path"]
    assert torch.equal(module.split_labels, labels)
    with torch.no_grad():
        module.network.branches[-1].deconv.bias.add_(0.01)
    third = module.compute_split(datamodule)
    assert not third["cached"] and third["path"] != first["path"]
    assert len(list((tmp_path / "splits").glob("split-*.npz"))) == 2
    other = _tiny_module(split_cache_dir=str(tmp_path / "splits"))
    assert other.compute_split(datamodule)["cached"]                  # same init weights -> same key


@pytest.mark.unit
def test_split_cache_survives_recopied_images(tmp_path: Path, photo_folder: Path) -> None:
    """The key hashes the arrays' bytes: new source mtimes rename the array cache files, not the split key."""
    import os

    from effsr.data import SRDataModule

    def datamodule() -> SRDataModule:
        return SRDataModule(scale=4, train=str(photo_folder), train_crop="grid", hr_subimage_size=128,
                            hr_subimage_step=64, num_workers=0, val_sets=[], cache_dir=str(tmp_path / "cache"))

    module = _tiny_module(split_cache_dir=str(tmp_path / "splits"))
    first_data = datamodule()
    assert not module.compute_split(first_data)["cached"]
    names = sorted(pair.lr_file.name for pair in first_data.train_dataset.store.pairs)
    for image in photo_folder.iterdir():
        os.utime(image, ns=(1_000_000_000, 1_000_000_000))              # the same images, copied again
    second_data = datamodule()
    second_data.setup("fit")
    assert sorted(pair.lr_file.name for pair in second_data.train_dataset.store.pairs) != names
    assert module.compute_split(second_data)["cached"]


@pytest.mark.unit
def test_routed_inference_equals_per_patch_loop_and_counts_macs() -> None:
    module = _tiny_module(stride=28).eval()
    with torch.no_grad():
        module.network.classifier.linear.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
    lr = torch.rand(1, 3, 45, 70)
    routed = module.route(lr, count_macs=True)
    assert routed.sr.shape == (1, 3, 180, 280)
    expected, weight = torch.zeros_like(routed.sr), torch.zeros(1, 1, 180, 280)
    with torch.no_grad():
        for (y, x), choice in zip(routed.corners, routed.route_map.flatten().tolist(), strict=True):
            patch = lr[..., y:y + 32, x:x + 32]
            assert choice == int(module.network.classifier(patch).argmax())
            expected[..., 4 * y:4 * y + 128, 4 * x:4 * x + 128] += module.network.branches[choice](patch)
            weight[..., 4 * y:4 * y + 128, 4 * x:4 * x + 128] += 1
    assert torch.allclose(routed.sr, expected / weight, atol=1e-5)

    def evaluated_macs(evaluated: ClassSRModule) -> float:
        """``macs`` of the image's record, as SRModule's evaluation derives it from what ``infer`` measured."""
        with torch.no_grad(), evaluated.measuring() as measured:
            sr = evaluated.infer(lr).clamp(0, 1)
        return evaluated.image_measurements(measured, sr, sr)["macs"]

    assert evaluated_macs(module) == pytest.approx(routed.macs, rel=1e-9)
    forced = _tiny_module(force_branch=2).eval()
    forced.load_state_dict(module.state_dict())
    wide = forced.route(lr, count_macs=True)
    assert wide.patches_per_network.tolist() == [0, 0, len(wide.corners)]
    assert wide.macs == pytest.approx(evaluated_macs(forced), rel=1e-9)


@pytest.mark.unit
def test_routed_msrresnet_branches_run_fused_and_equal_the_per_patch_loop() -> None:
    """Routed inference runs each branch's deploy form (conv + LeakyReLU fused); it equals the plain loop."""
    from effsr.inference.deploy import FusedConvActivation, deployed

    torch.manual_seed(0)
    network = ClassSRNet(backbone="MSRResNet", widths=[4, 6, 8], scale=4, backbone_args={"num_blocks": 1})
    module = ClassSRModule(network=network).eval()

    class ByBrightness(torch.nn.Module):
        """Logits of a forced routing: mean < 0.2 → narrow, < 0.35 → medium, else wide."""

        def forward(self, patches: torch.Tensor) -> torch.Tensor:
            mean = patches.mean(dim=(1, 2, 3))
            return torch.stack([mean < 0.2, (mean >= 0.2) & (mean < 0.35), mean >= 0.35], dim=1).float()

    network.classifier = ByBrightness()
    lr = torch.rand(1, 3, 40, 88) * torch.linspace(0, 1, 88)    # patches from dark to bright
    routed = module.route(lr)
    # conv_first, the block's conv1, upconv1, upconv2 (through PixelShuffle) and conv_hr of every branch
    assert [sum(isinstance(m, FusedConvActivation) for m in deployed(branch).modules())
            for branch in network.branches] == [5, 5, 5]
    expected, weight = torch.zeros_like(routed.sr), torch.zeros(1, 1, 160, 352)
    with torch.no_grad():
        for (y, x), choice in zip(routed.corners, routed.route_map.flatten().tolist(), strict=True):
            patch = lr[..., y:y + 32, x:x + 32]
            expected[..., 4 * y:4 * y + 128, 4 * x:4 * x + 128] += network.branches[choice](patch)
            weight[..., 4 * y:4 * y + 128, 4 * x:4 * x + 128] += 1
    assert routed.patches_per_network.tolist() == [2, 2, 2]
    assert (routed.sr - expected / weight).abs().max() <= 1e-6


@pytest.mark.e2e
def test_tiny_pipeline_all_phases_then_test_routed_costs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         assert_psnr_in_range: Callable[[float], None]) -> None:
    import effsr.cli as cli

    monkeypatch.chdir(tmp_path)
    # An absolute W&B folder: wandb-core, started by an earlier test, resolves relative paths in its own cwd.
    save_dir = f"--trainer.logger.init_args.save_dir={tmp_path / 'runs' / 'tiny_classsr_x4'}"
    assert cli.main(["fit", "--config", str(TINY), save_dir]) == 0
    checkpoint_path = next(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    schedule = next(value for key, value in checkpoint["callbacks"].items() if "PhaseSchedule" in key)
    assert [name for name, _ in schedule["history"]] == ["reference", "split", "branches", "classifier", "joint"]
    structure = checkpoint["effsr"]["structure"]
    assert len(structure["split_thresholds"]) == 2 and structure["split_labels"] is not None
    assert Path(structure["split_info"]["path"]).is_file()
    assert (tmp_path / "runs" / "tiny_classsr_x4" / "classsr_split_histogram.png").is_file()
    media = [str(path) for path in tmp_path.rglob("media/images/**/*.png")]
    assert any("split_psnr_histogram" in name for name in media) and any("val_routes" in name for name in media)
    assert cli.main(["test", "--config", str(TINY), "--ckpt_path", str(checkpoint_path), "--trainer.logger=false"]) == 0
    results = json.loads(next(tmp_path.rglob("test_results.json")).read_text())["sample"]
    # What a 75-step run learns (PSNR, routing shares) differs between CPUs: only finite, in-range numbers and
    # costs that follow from the measured routing are asserted; routed < wide is forced in the tests above.
    assert results["n_images"] == 3 and len(results["images"]) == 3
    for value in (results["psnr_y"], results["psnr_rgb_crop4"]):
        assert_psnr_in_range(value)
    assert results["psnr_y"] == pytest.approx(np.mean([row["psnr_y"] for row in results["images"].values()]))
    assert len(results["class_proportions"]) == 3 and sum(results["class_proportions"]) == pytest.approx(1.0)
    expected = _expected_patch_costs(_tiny_config_network())
    for image in results["images"].values():
        assert {"psnr_y", "psnr_rgb_crop4", "class_proportions", "macs", "flops_classsr"} <= set(image)
        counts = image["class_counts"]
        assert sum(counts) == image["patches"] > 0
        assert image["macs"] == sum(c * m for c, m in zip(counts, expected["branches"], strict=True)) \
            + image["patches"] * expected["classifier"]
        assert image["macs_wide"] == image["patches"] * expected["branches"][-1]
    assert results["macs"] == pytest.approx(np.mean([image["macs"] for image in results["images"].values()]))
    assert results["macs_percent_of_wide"] == pytest.approx(100 * results["macs"] / results["macs_wide"])
    at_shares = _expected_routed_cost(_tiny_config_network(), results["class_proportions"])
    assert results["macs_720p"] == pytest.approx(at_shares["macs_720p"], abs=1)
    # last.ckpt is written at the epoch's last batch, before that epoch's validation: this one-epoch run's
    # checkpoint has no measured class counts yet. `effsr profile` at the shares `effsr test` measured:
    assert structure["measured_class_counts"] is None
    profile_json = tmp_path / "profile.json"
    shares = results["class_proportions"]
    assert cli.main(["profile", "--config", str(TINY), "--ckpt_path", str(checkpoint_path), "--runs", "1",
                     "--lr_size", "32", "40", "--output", str(profile_json),
                     f"--model.init_args.cost_proportions=[{','.join(map(str, shares))}]"]) == 0
    report = json.loads(profile_json.read_text())
    assert report["network"] == "RoutedClassSR" and report["class_proportions_source"] == "cost_proportions option"
    assert report["class_proportions"] == pytest.approx(shares)
    assert report["macs_720p"] == pytest.approx(report["method_macs_720p"], abs=1)
    routed = _expected_routed_cost(_tiny_config_network(), shares)
    assert report["macs_720p"] == pytest.approx(routed["macs_720p"], abs=1)
    assert report["macs_720p_wide"] == routed["wide_720p"] < report["macs_720p_soft_mixture"]


@pytest.mark.ddp
def test_ddp_two_processes_split_and_classifier_phase(tmp_path: Path) -> None:
    from effsr.cli import load_module_from_config

    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update({"max_steps": 4, "logger": False, "default_root_dir": str(tmp_path / "run"),
                              "check_val_every_n_epoch": 100})
    config["trainer"]["callbacks"][0]["init_args"]["phases"] = [
        {"name": "split", "steps": 0}, {"name": "classifier", "steps": 4, "settings": {"lr": 1.0e-2}}]
    config["data"].update({"batch_size": 4, "samples_per_epoch": 32})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "effsr.cli", "fit", "--config", str(path), "--trainer.strategy=ddp",
               "--trainer.devices=2", "--trainer.accelerator=cpu"]
    run = run_bounded(command, timeout=300, cwd=tmp_path,
                      env={**os.environ, "WANDB_MODE": "offline"})
    assert run.returncode == 0, run.stderr[-3000:]
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert trained["global_step"] == 4 and trained["effsr"]["phase_name"] == "classifier"
    labels = trained["effsr"]["structure"]["split_labels"]
    assert labels is not None and np.ptp(np.bincount(labels.numpy())) <= 1
    initial = load_module_from_config(["--config", str(path)], None).state_dict()
    state = {key.removeprefix("network."): value for key, value in trained["state_dict"].items()}
    assert not torch.equal(state["classifier.linear.weight"], initial["network.classifier.linear.weight"])
    for key, value in state.items():
        if key.startswith("branches."):
            assert torch.equal(value, initial[f"network.{key}"]), key


@pytest.mark.unit
def test_split_phase_needs_a_data_module_that_restricts_training_draws() -> None:
    """The split and per-class phases need :class:`TrainSubsetSettable` of the trainer's data module (SRDataModule
    has it); without one the split names the fix instead of failing on a missing attribute."""
    import lightning

    from effsr.data import SRDataModule
    from effsr.methods.classsr import TrainSubsetSettable

    assert isinstance(SRDataModule(scale=4, train="sample", val_sets=[]), TrainSubsetSettable)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    module = _tiny_module(export_backbones=False)
    module.trainer = trainer  # attached, as in a fit, but without a data module
    with pytest.raises(ConfigError, match="need effsr's SRDataModule"):
        module.on_phase_start("split", {})


@pytest.mark.unit
def test_resume_restores_split_and_trainable_set_of_the_phase() -> None:
    module = _tiny_module()
    labels = torch.tensor([0, 1, 2, 2, 1, 0], dtype=torch.uint8)
    state = {"phase_name": "classifier", "phase_settings": {"lr": 1e-3}, "schedule_values": {},
             "structure": {"split_thresholds": [30.0, 25.0], "split_key": "k", "split_labels": labels,
                           "split_info": {}}}
    module.on_load_checkpoint({"effsr": state})
    assert torch.equal(module.split_labels, labels) and module.split_thresholds == [30.0, 25.0]
    assert all(p.requires_grad for p in module.network.classifier.parameters())
    assert not any(p.requires_grad for p in module.network.branches.parameters())
    state.update(phase_name="branches_1", phase_settings={"branch": 1})
    module.on_load_checkpoint({"effsr": state})
    assert [any(p.requires_grad for p in b.parameters()) for b in module.network.branches] == [False, True, False]
    assert module.labels_for(torch.tensor([2, 4])).tolist() == [2, 1]


def _tiny_config_network() -> ClassSRNet:
    """The network of experiments/tiny/classsr_x4.yaml (MSRResNet F 8/12/16, 1 block), random weights."""
    torch.manual_seed(0)
    settings = yaml.safe_load(TINY.read_text())["model"]["init_args"]["network"]["init_args"]
    return ClassSRNet(**settings, scale=4)


def _expected_patch_costs(network: ClassSRNet) -> dict:
    """MACs of one 32×32 LR patch through each branch and through the classifier, counted with effsr.cost."""
    from effsr.cost import count_macs

    patch = torch.zeros(1, 3, 32, 32)
    return {"branches": [count_macs(branch, patch) for branch in network.branches],
            "classifier": count_macs(network.classifier, patch)}


_BRANCH_COUNTS: dict[str, tuple[list[int], list[int], int, int]] = {}


def _branch_counts(network: ClassSRNet) -> tuple[list[int], list[int], int, int]:
    """MACs of each branch at 720p and per 32×32 patch, of the classifier per patch and on the 720p LR frame,
    counted by running the real modules with effsr.cost (no ClassSR cost code, no meta copy; a branch at 720p on
    a 1/100-area frame, :func:`conftest.macs_720p_by_area`). Counts follow from the architecture alone, so they are
    counted once per architecture (its repr) and reused."""
    from conftest import macs_720p_by_area

    from effsr.cost import count_macs

    key = repr(network)
    if key not in _BRANCH_COUNTS:
        patch = torch.zeros(1, 3, 32, 32)
        _BRANCH_COUNTS[key] = ([macs_720p_by_area(branch, 4) for branch in network.branches],
                               [count_macs(branch, patch) for branch in network.branches],
                               count_macs(network.classifier, patch),
                               count_macs(network.classifier, torch.zeros(1, 3, 180, 320)))
    return _BRANCH_COUNTS[key]


def _expected_routed_cost(network: ClassSRNet, proportions: list[float], classifier: bool = True) -> dict:
    """ClassSR's cost counted independently, branch by branch, with effsr.cost (no ClassSR cost code)."""
    branch_720p, branch_patch, classifier_patch, classifier_frame = _branch_counts(network)
    classifier_patch = classifier_patch if classifier else 0
    # The 720p LR frame at ×4 is 320×180: patch 32, stride 28 -> 12 columns (0, 28, …, 280, flush 288) × 7 rows
    # (0, …, 140, flush 148) = 84 patches, each classified once.
    return {"macs_720p": sum(p * m for p, m in zip(proportions, branch_720p, strict=True)) + 84 * classifier_patch,
            "macs_per_lr_patch_32": sum(p * m for p, m in zip(proportions, branch_patch, strict=True))
            + classifier_patch,
            "wide_720p": branch_720p[-1], "wide_patch": branch_patch[-1],
            "soft_mixture": sum(branch_720p) + classifier_frame}


@pytest.mark.unit
def test_profile_headline_is_the_routed_cost_at_the_class_proportions() -> None:
    from effsr.profile import format_profile_table, profile_network

    network = _tiny_config_network()
    module = ClassSRModule(network=network).eval()

    def profile(model: ClassSRModule) -> dict:
        report = profile_network(model.deployed_network(), 4, lr_size=(36, 60), runs=1, warmup=0)
        assert json.loads(json.dumps(report)) == report
        return report

    # Never evaluated: equal shares, labelled as an assumption.
    report = profile(module)
    assert report["network"] == "RoutedClassSR" and report["class_proportions_source"].startswith("uniform 1/3")
    expected = _expected_routed_cost(network, [1 / 3] * 3)
    assert report["tile_patches_720p"] == 84
    assert report["macs_720p"] == pytest.approx(expected["macs_720p"], abs=1)
    assert report["macs_per_lr_patch_32"] == pytest.approx(expected["macs_per_lr_patch_32"], abs=1)
    assert report["flops_classsr"] == 2 * report["macs_per_lr_patch_32"]
    assert report["macs_720p_wide"] == expected["wide_720p"]
    assert report["flops_classsr_wide"] == 2 * expected["wide_patch"]
    assert report["macs_720p"] < report["macs_720p_wide"]
    assert report["macs_720p_percent_of_wide"] == pytest.approx(100 * expected["macs_720p"] / expected["wide_720p"])
    assert report["macs_720p_soft_mixture"] == expected["soft_mixture"] > report["macs_720p_wide"]
    assert module.cost_report()["macs_720p"] == pytest.approx(report["macs_720p"], abs=1)  # one implementation
    own = module.deployed_network().profile_costs(4)
    assert {key: report[key] for key in own} == own  # the profile's cost entries are the network's own
    table = format_profile_table(report)
    assert "MACs, 1280×720 output" in table and "uniform 1/3 (assumed" in table and "macs_720p_soft_mixture" in table

    # Measured shares: two routed validation images; the counts go into the checkpoint and come back.
    evaluated = ClassSRModule(network=network).eval()
    with torch.no_grad():
        evaluated.network.classifier.linear.bias.copy_(torch.tensor([0.3, 0.0, -0.3]))
    counts = torch.zeros(3)
    generator = torch.Generator().manual_seed(1)
    images = []
    for _ in ("a", "b"):  # what SRModule's evaluation calls for each image, then once for the set
        lr = torch.rand(1, 3, 60, 88, generator=generator) * torch.linspace(0, 1, 88)  # flat to busy
        with torch.no_grad(), evaluated.measuring() as measured_values:
            sr = evaluated.infer(lr)
        counts += evaluated.route(lr).patches_per_network  # the same routing, read through the public call
        images.append(evaluated.image_measurements(measured_values, sr.clamp(0, 1), sr.clamp(0, 1)))
    gen = evaluated.set_measurements(images)
    evaluated.on_eval_measured("val", {"gen": gen}, gen, len(images))
    checkpoint: dict = {}
    evaluated.on_save_checkpoint(checkpoint)
    measured = ClassSRModule(network=network).eval()
    measured.on_load_checkpoint(checkpoint)
    report = profile(measured)
    shares = (counts / counts.sum()).tolist()
    assert report["class_proportions"] == pytest.approx(shares) and len(set(shares)) > 1
    source = report["class_proportions_source"]
    assert source.startswith("measured") and f"val on gen: 2 images, {int(counts.sum())} patches" in source
    expected = _expected_routed_cost(network, shares)
    assert report["macs_720p"] == pytest.approx(expected["macs_720p"], abs=1)
    assert report["macs_720p"] < expected["wide_720p"]
    assert report["flops_classsr"] == pytest.approx(2 * expected["macs_per_lr_patch_32"], abs=2)

    # The proportions option wins over measured shares (normalised); force_branch is the wide branch alone. These
    # read the routed network's profile_costs, which the profiles above show to be what `effsr profile` reports.
    option = ClassSRModule(network=network, cost_proportions=[2, 1, 1]).eval()
    report = option.deployed_network().profile_costs(4)
    assert report["class_proportions"] == [0.5, 0.25, 0.25]
    assert report["class_proportions_source"] == "cost_proportions option"
    assert report["macs_720p"] == pytest.approx(_expected_routed_cost(network, [0.5, 0.25, 0.25])["macs_720p"], abs=1)
    forced = ClassSRModule(network=network, force_branch=2).eval().deployed_network().profile_costs(4)
    assert forced["macs_720p"] == forced["macs_720p_wide"] and forced["macs_720p_percent_of_wide"] == 100.0
    with pytest.raises(ConfigError, match="cost_proportions"):
        ClassSRModule(network=network, cost_proportions=[1, 1])
    with pytest.raises(ConfigError, match="route_batch_size"):
        ClassSRModule(network=network, route_batch_size=0)


@pytest.mark.unit
def test_unstarted_branch_is_warned_about(tmp_path: Path, photo_folder: Path) -> None:
    """A branch forced to its bilinear skip (zeroed conv_last) is reported; one with a residual is not."""
    from effsr.data import SRDataModule

    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.MSRResNet", widths=[4, 6], scale=4, backbone_args={"num_blocks": 1})
    with torch.no_grad():
        network.branches[0].conv_last.weight.zero_()
        network.branches[0].conv_last.bias.zero_()          # out == bilinear(lr) exactly
        network.branches[1].conv_last.bias.fill_(0.01)      # out == bilinear(lr) + ~0.01
    module = ClassSRModule(network=network)
    datamodule = SRDataModule(scale=4, train=str(photo_folder), train_crop="grid", hr_subimage_size=128,
                              hr_subimage_step=64, num_workers=0, val_sets=[], cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="branch 0 has not started learning") as record:
        assert module.warn_unstarted_branches(datamodule=datamodule) == [0]
    assert not any("branch 1" in str(item.message) for item in record)
    assert module.warn_unstarted_branches() == []            # no trainer, no data module: nothing checked
    # a classifier phase on random crops (no grid sub-images) checks epoch 0's first crops instead of failing
    crops = SRDataModule(scale=4, train=str(photo_folder), train_crop="random", lr_patch_size=32, num_workers=0,
                         val_sets=[], cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="branch 0 has not started learning"):
        assert module.warn_unstarted_branches(datamodule=crops) == [0]
    assert module._first_subimages(8, crops).shape[-2:] == (32, 32)


@pytest.mark.unit
def test_unstarted_reference_is_warned_about(tmp_path: Path, photo_folder: Path) -> None:
    """The reference (the wide branch when the split starts) at its bilinear skip is reported; with a residual not."""
    from effsr.data import SRDataModule

    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.MSRResNet", widths=[4, 6], scale=4, backbone_args={"num_blocks": 1})
    datamodule = SRDataModule(scale=4, train=str(photo_folder), train_crop="grid", hr_subimage_size=128,
                              hr_subimage_step=64, num_workers=0, val_sets=[], cache_dir=str(tmp_path / "cache"))
    module = ClassSRModule(network=network)
    with torch.no_grad():
        network.branches[-1].conv_last.weight.zero_()
        network.branches[-1].conv_last.bias.zero_()         # out == bilinear(lr) exactly
    with pytest.warns(UserWarning, match=r"the reference \(-O model\) has not started learning"):
        assert module.warn_unstarted_reference(datamodule=datamodule)
    with torch.no_grad():
        network.branches[-1].conv_last.bias.fill_(0.01)     # out == bilinear(lr) + ~0.01
    assert not module.warn_unstarted_reference(datamodule=datamodule)
    assert not module.warn_unstarted_reference()           # no trainer, no data module: nothing checked


@pytest.mark.unit
def test_constant_classifier_is_warned_about(tmp_path: Path, photo_folder: Path) -> None:
    """The logits' std over training sub-images is what is checked; zeroed convs (routing by the biases alone,
    the same class for every patch) are reported, a patch-dependent classifier is not."""
    import warnings

    from effsr.data import SRDataModule

    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.MSRResNet", widths=[4, 6], scale=4, backbone_args={"num_blocks": 1},
                         classifier_init_scale=1.0)
    module = ClassSRModule(network=network)
    datamodule = SRDataModule(scale=4, train=str(photo_folder), train_crop="grid", hr_subimage_size=128,
                              hr_subimage_step=64, num_workers=0, val_sets=[], cache_dir=str(tmp_path / "cache"))
    datamodule.setup("fit")
    lr = next(iter(datamodule.subimage_dataloader(batch_size=64, split_across_ranks=False)))["lr"].float() / 255
    with torch.no_grad():
        expected = float(network.classifier.eval()(lr).std(dim=0).mean())
    assert expected > 1e-4, expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.warn_constant_classifier(datamodule=datamodule) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        for conv in network.classifier.features:
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.zero_()
                conv.bias.fill_(0.1)
    with pytest.warns(UserWarning, match="barely depend on the patch"):
        assert module.warn_constant_classifier(datamodule=datamodule) == 0.0
    assert module.warn_constant_classifier() is None              # no trainer, no data module: nothing checked
