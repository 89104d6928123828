"""ClassSR against the official code and the paper's experiment (issue 14): the -O model kept as its own
checkpoint, a loaded reference untouched before the split, ``split_model`` and fixed thresholds, the official
FSRCNN variant and classifier initialisation, the official options of the paper configs."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from effsr.cost import count_params
from effsr.errors import CheckpointError, ConfigError
from effsr.methods.classsr import (
    Classifier,
    ClassSRModule,
    ClassSRNet,
    load_reference_weights,
    split_by_score,
    split_by_thresholds,
)
from effsr.metrics import psnr

if TYPE_CHECKING:
    from conftest import CodePickle

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny" / "classsr_x4.yaml"
PAPER_CONFIGS = sorted((REPO / "experiments").glob("classsr_*.yaml"))


def _network(widths: tuple[int, int, int] = (4, 6, 8)) -> ClassSRNet:
    torch.manual_seed(0)
    return ClassSRNet(backbone="effsr.archs.MSRResNet", widths=list(widths), scale=4, backbone_args={"num_blocks": 1})


# ------------------------------------------------------------------ architecture and initialisation
@pytest.mark.unit
def test_official_fsrcnn_variant_matches_a_hand_count_of_the_official_module() -> None:
    from effsr.archs import FSRCNNOfficial

    d, s, m = 56, 12, 4
    # official FSRCNN_net(3, 4, d, s, m): head 5x5 conv 3->d + PReLU(1); 1x1 d->s + PReLU(1); m linear 3x3 s->s;
    # one PReLU(1); 1x1 s->d + PReLU(1); 9x9 deconv d->3.
    hand = (3 * d * 25 + d + 1) + (d * s + s + 1) + m * (s * s * 9 + s) + 1 + (s * d + d + 1) + (d * 3 * 81 + 3)
    network = FSRCNNOfficial(4, d, s, m)
    assert count_params(network) == hand == 24515
    body = list(network.body_conv)
    assert [type(layer).__name__ for layer in body] == ["Sequential"] + ["Conv2d"] * m + ["PReLU", "Sequential"]
    assert all(layer.num_parameters == 1 for layer in network.modules() if isinstance(layer, nn.PReLU))
    assert {"head_conv.0.weight", "body_conv.1.weight", "body_conv.5.weight", "tail_conv.weight"} <= set(
        network.state_dict())
    assert network(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 32, 32)


@pytest.mark.unit
def test_classifier_convs_start_kaiming_times_point_one_with_zero_bias() -> None:
    torch.manual_seed(0)
    classifier = Classifier()
    convs = [module for module in classifier.features if isinstance(module, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.std().item() == pytest.approx(0.1 * (2.0 / fan_in) ** 0.5, rel=0.15)
    probabilities = torch.softmax(classifier(torch.rand(16, 3, 32, 32)), dim=1)
    assert (probabilities - 1 / 3).abs().max() < 0.1  # near-uniform start


@pytest.mark.unit
def test_classifier_init_scale_option_scales_the_convs_only() -> None:
    """effsr's `classifier_init_scale`: the conv weights' std is scale x Kaiming, biases zero, the linear layer
    PyTorch's default; <= 0 is refused."""
    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.FSRCNN", widths=[4, 8], scale=4, classifier_init_scale=1.0,
                         backbone_args={"shrink_features": 4, "num_mapping": 1})
    convs = [module for module in network.classifier.features if isinstance(module, nn.Conv2d)]
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.15)
    bound = 1 / 32 ** 0.5  # nn.Linear's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert network.classifier.linear.weight.abs().max().item() <= bound
    with pytest.raises(ConfigError, match="init_scale"):
        Classifier(init_scale=0.0)


# ------------------------------------------------------------------ split options
@pytest.mark.unit
def test_fixed_thresholds_assign_classes_as_the_official_divide_script() -> None:
    scores = np.array([40.0, 35.15, 35.0, 27.17, 27.0, np.inf, 10.0])
    # official: psnr >= 35.15 -> class 1 (narrow); 27.17 <= psnr < 35.15 -> class 2; psnr < 27.17 -> class 3
    assert split_by_thresholds(scores, [27.17, 35.15]).tolist() == [0, 0, 1, 1, 2, 0, 2]
    assert split_by_thresholds(scores, [35.15, 27.17]).tolist() == [0, 0, 1, 1, 2, 0, 2]


@pytest.mark.unit
def test_flush_crop_only_past_the_official_48_px_strip() -> None:
    from effsr.data.datasets import grid_positions

    # official extract_subimages_train.py at x4 on an HR axis of 1000 px: crops of 128 every 64 end at 960,
    # strip 40 <= 48: no flush crop; at 1020 px the strip is 60 > 48: a crop at 1020 - 128 = 892 is added.
    def official(length: int, crop: int = 128, step: int = 64, thres: int = 48) -> list[int]:
        space = list(range(0, length - crop + 1, step))
        return space + ([length - crop] if length - (space[-1] + crop) > thres else [])

    for hr_length in (1000, 1020, 1024, 968, 977):
        lr = grid_positions(hr_length // 4, 32, 16, 48 // 4)
        assert (lr * 4).tolist() == official(hr_length - hr_length % 4), hr_length
    assert grid_positions(250, 32, 16).tolist()[-1] == 250 - 32  # default 0: any strip gets the flush crop


@pytest.mark.unit
def test_split_thresholds_option_needs_k_minus_one_values() -> None:
    with pytest.raises(ConfigError, match="split_thresholds needs 2 values"):
        ClassSRModule(_network(), split_thresholds=[30.0])


def _datamodule(folder: Path, tmp_path: Path):  # noqa: ANN202 - SRDataModule
    from effsr.data import SRDataModule

    return SRDataModule(scale=4, train=str(folder), train_crop="grid", hr_subimage_size=128, hr_subimage_step=64,
                        num_workers=0, val_sets=[], cache_dir=str(tmp_path / "cache"))


@torch.no_grad()
def _direct_scores(network: nn.Module, datamodule) -> np.ndarray:  # noqa: ANN001
    """RGB PSNR (crop = scale) of every sub-image through ``network``, one sub-image at a time."""
    dataset = datamodule.train_dataset
    network.eval()
    values = []
    for index in range(dataset.num_subimages):
        lr, hr = (torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255 for array in dataset.subimage(index))
        values.append(float(psnr(network(lr), hr, crop_border=4, y_channel=False)[0]))
    return np.array(values)


@pytest.mark.unit
def test_split_model_scores_the_split_and_fixed_thresholds_cut_it(tmp_path: Path, photo_folder: Path) -> None:
    datamodule = _datamodule(photo_folder, tmp_path)
    datamodule.setup("fit")
    torch.manual_seed(1)
    from effsr.archs import MSRResNet

    scorer = MSRResNet(4, num_features=8, num_blocks=1)
    run = tmp_path / "scorer_run"
    run.mkdir()
    torch.save({"state_dict": {f"network.{k}": v for k, v in scorer.state_dict().items()}}, run / "model.ckpt")
    config = {"model": {"class_path": "effsr.models.SRModule", "init_args": {"network": {
        "class_path": "effsr.archs.MSRResNet", "init_args": {"num_features": 8, "num_blocks": 1}}}},
        "data": {"scale": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    expected = _direct_scores(scorer, datamodule)

    module = ClassSRModule(_network(), split_model=str(run / "model.ckpt"), split_cache_dir=str(tmp_path / "s"))
    module.compute_split(datamodule)
    stored = np.load(module.split_info["path"])["scores"]
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-3)  # batched vs one-by-one rounding
    assert not np.allclose(stored, _direct_scores(module.network.branches[-1], datamodule))
    assert module.split_labels.tolist() == split_by_score(stored, 3)[0].tolist()

    fixed = ClassSRModule(_network(), split_model=str(run / "model.ckpt"), split_cache_dir=str(tmp_path / "s"),
                          split_thresholds=[float(np.median(expected)), float(expected.min()) + 0.01])
    info = fixed.compute_split(datamodule)
    assert info["cached"]  # same scorer, same data: the scores are reused, only the cut differs
    assert fixed.split_labels.tolist() == split_by_thresholds(stored, fixed.fixed_thresholds).tolist()
    assert fixed.split_thresholds == sorted(fixed.fixed_thresholds, reverse=True)

    wrong = tmp_path / "x2"
    wrong.mkdir()
    (wrong / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"scale": 2}}))
    (wrong / "model.ckpt").write_bytes((run / "model.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="x2 model"):
        ClassSRModule(_network(), split_model=str(wrong / "model.ckpt")).compute_split(datamodule)


# ------------------------------------------------------------------ the reference (-O) model
@pytest.mark.unit
def test_reference_checkpoint_is_not_read_in_init_and_a_code_pickle_is_refused(tmp_path: Path,
                                                                               code_pickle: CodePickle) -> None:
    ClassSRModule(_network(), reference_checkpoint=str(tmp_path / "missing.ckpt"))  # no I/O at instantiation
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as stream:
        pickle.dump({"state_dict": code_pickle}, stream, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load reference_checkpoint"):
        load_reference_weights(_network(), str(evil))
    assert not code_pickle.ran


@pytest.mark.unit
def test_params_under_force_branch_count_the_branch_that_runs() -> None:
    network = _network()
    module = ClassSRModule(network, force_branch=1)
    assert module.cost_report()["params"] == count_params(network.branches[1])
    assert ClassSRModule(network).cost_report()["params"] == count_params(network)


@pytest.mark.e2e  # `effsr fit` of a reference -> split -> branches pipeline, then `effsr test` of its -O model
def test_loaded_reference_is_split_unchanged_and_kept_as_its_own_evaluable_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_folder: Path) -> None:
    import effsr.cli as cli

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(TINY.read_text())
    wide = ClassSRNet(**{k: v for k, v in config["model"]["init_args"]["network"]["init_args"].items()}, scale=4)
    torch.manual_seed(3)
    for parameter in wide.branches[-1].parameters():
        parameter.data.normal_(0, 0.05)
    reference = {key: value.clone() for key, value in wide.branches[-1].state_dict().items()}
    torch.save({"state_dict": {f"network.{k}": v for k, v in reference.items()}}, tmp_path / "reference_in.ckpt")
    config["trainer"]["callbacks"][0]["init_args"]["phases"] = [
        # a huge lr: the one step the `until` phase takes would change every weight visibly
        {"name": "reference", "until": "reference_ready", "max_steps": 5, "settings": {"lr": 0.5}},
        {"name": "split", "steps": 0},
        {"name": "branches", "steps": 1, "settings": {"branch": 0, "lr": 1.0e-3}},
    ]
    config["trainer"].update(max_steps=2, logger=False, default_root_dir=str(tmp_path / "run"))
    config["trainer"]["check_val_every_n_epoch"] = 100
    config["model"]["init_args"].update(reference_checkpoint=str(tmp_path / "reference_in.ckpt"),
                                        split_cache_dir=str(tmp_path / "splits"))
    # two 256² photos cut into 8 sub-images (instead of the sample set's 147): every one is scored twice below
    config["data"].update(train=str(photo_folder), hr_subimage_step=128, val_sets=[str(photo_folder)])
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0

    saved = torch.load(tmp_path / "run" / "reference" / "reference.ckpt", map_location="cpu", weights_only=True)
    for key, value in reference.items():
        assert torch.equal(saved["state_dict"][f"network.{key}"], value), key

    from effsr.data import SRDataModule

    data = config["data"]
    datamodule = SRDataModule(scale=4, train=data["train"], train_crop="grid", num_workers=0, val_sets=[],
                              hr_subimage_size=data["hr_subimage_size"], hr_subimage_step=data["hr_subimage_step"])
    datamodule.setup("fit")
    wide.branches[-1].load_state_dict(reference)
    expected = _direct_scores(wide.branches[-1], datamodule)
    stored = np.load(next((tmp_path / "splits").glob("split-*.npz")))["scores"]
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-3)  # batched vs one-by-one rounding
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    labels = last["effsr"]["structure"]["split_labels"]
    assert labels.tolist() == split_by_score(stored, 3)[0].tolist()

    # effsr test evaluates the -O model as a plain backbone from its own folder
    folder = tmp_path / "run" / "reference"
    assert cli.main(["test", "--config", str(folder / "config.yaml"), "--ckpt_path", str(folder / "reference.ckpt"),
                     f"--trainer.default_root_dir={tmp_path / 'test_O'}", f"--data.test_sets=[{photo_folder}]",
                     "--data.max_val_images=1"]) == 0
    results = json.loads((tmp_path / "test_O" / "test_results.json").read_text())
    assert results[photo_folder.parent.name]["params"] == count_params(wide.branches[-1])  # "hr/": parent's name


# ------------------------------------------------------------------ paper configs and the harness
@pytest.mark.unit
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[path.stem for path in PAPER_CONFIGS])
def test_paper_configs_default_to_the_official_recipe(path: Path) -> None:
    from effsr.cli_support import composed_yaml, config_chain

    text = "".join(item.read_text() for item in config_chain(path))  # the per-scale file and its recipes
    config = composed_yaml(path)
    model = config["model"]["init_args"]
    phases = {phase["name"]: phase for phase in config["trainer"]["callbacks"][0]["init_args"]["phases"]}
    assert model["wide_from_reference"] is False
    assert "force_branch 2        # every patch through the wide branch (the \"-O\"" not in text
    assert "reference/reference.ckpt" in text
    rcan = "rcan" in path.stem
    assert model["loss_weights"] == ([1020.0, 0.5, 3.0] if rcan else [1000.0, 0.5, 3.0])
    for name in ("classifier", "joint"):
        assert phases[name]["settings"]["eta_min"] == (2.0e-6 if rcan else 1.0e-7)
    if rcan:
        assert phases["reference"]["settings"]["lr"] == phases["branches_0"]["settings"]["lr"] == 2.0e-4
    if "fsrcnn" in path.stem:
        assert model["network"]["init_args"]["backbone"] == "effsr.archs.FSRCNNOfficial"
    assert config["data"]["hr_subimage_flush_above"] == 48
    if path.stem in ("classsr_fsrcnn_x4", "classsr_carnm_x4", "classsr_rcan_x4"):
        assert model["split_model"] == "runs/classsr_msrresnet_x4/reference/reference.ckpt"


@pytest.mark.unit
def test_harness_declares_classsr_against_its_minus_o_model() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _reproduce_experiments import EXPERIMENTS

    experiment = EXPERIMENTS["classsr_x4"]
    roles = {model.name: (model.role, model.from_run) for model in experiment.models}
    assert roles["classsr"][0] == "method" and experiment.claim == ("classsr", "-O")
    assert roles["-O"] == ("baseline", ("classsr", "reference/reference.ckpt"))
    assert all(roles[f"branch_{k}"] == ("variant", ("classsr", f"branch_{k}/branch_{k}.ckpt")) for k in range(3))
