"""Per-set evaluation: every set's metrics and measured cost come from that set's images only, over all ranks,
reset every evaluation; one readable table / line per evaluation on the console.

Masks and routing are forced to depend on the image content deterministically (no training): SMSR's spatial
masks fire where the features are textured, ClassSR's classifier routes a patch by its mean brightness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bounded_run import run_bounded
from torch import Tensor

from effsr.cost import count_macs
from effsr.data import SRDataModule
from effsr.data.io import write_image
from effsr.inference.tiling import tile_grid
from effsr.methods.classsr import ClassSRModule, ClassSRNet
from effsr.methods.smsr import SMSR, SMSRModule, analytic_macs_720p

TESTS = Path(__file__).parent
TEXTURE_THRESHOLD = 1e-4


def texture_logits(feature: Tensor) -> Tensor:
    """[dense, sparse] logits: sparse (computed) where the channel-mean feature differs from its 3×3 mean."""
    mean = feature.mean(dim=1, keepdim=True)
    local = F.avg_pool2d(F.pad(mean, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    fire = ((mean - local).abs() > TEXTURE_THRESHOLD).to(feature.dtype)
    return torch.cat([1 - 2 * fire, 2 * fire - 1], dim=1)


class TextureSMSR(SMSR):
    """SMSR whose spatial masks follow :func:`texture_logits` (also usable as a config class_path)."""

    def __init__(self, scale: int = 2, num_features: int = 16, num_modules: int = 2, pixel_range: float = 1.0) -> None:
        torch.manual_seed(0)
        super().__init__(scale=scale, num_features=num_features, num_modules=num_modules, pixel_range=pixel_range)
        for module in self.body:
            module.spatial_logits = texture_logits


def _write_set(folder: Path, kind: str, count: int, size: tuple[int, int] = (48, 64)) -> Path:
    """``flat`` (one grey level per image), ``noise`` (uniform noise) or ``halves`` (dark left, bright right,
    the edge inside a routing patch)."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(len(kind) + count)
    for index in range(count):
        height, width = size
        if kind == "flat":
            image = np.full((height, width, 3), 40 + 30 * index, dtype=np.uint8)
        elif kind == "noise":
            image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            image = np.full((height, width, 3), 26, dtype=np.uint8)
            image[:, width * 11 // 20 - 8 * index:] = 230
        write_image(folder / f"{kind}{index}.png", image)
    return folder


def _test(module: L.LightningModule, sets: list[Path], root: Path, scale: int) -> dict:
    datamodule = SRDataModule(scale=scale, val_sets=[], test_sets=[str(path) for path in sets], num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = json.loads((root / "test_results.json").read_text())
    return {"results": results, "logged": {key: float(value) for key, value in trainer.callback_metrics.items()},
            "datamodule": datamodule}


def _lr_images(datamodule: SRDataModule) -> dict[str, dict[str, Tensor]]:
    """Each test set's LR images as float (1, 3, h, w) in [0, 1], read from the datamodule's datasets."""
    images: dict[str, dict[str, Tensor]] = {}
    for dataset in datamodule.test_datasets:
        items = [dataset[index] for index in range(len(dataset))]
        images[dataset.name] = {item["name"]: item["lr"][None].float() / 255 for item in items}
    return images


def _expected_smsr(network: SMSR, images: dict[str, Tensor]) -> dict[str, float]:
    """Mean over the images of the sparse path's MACs at each image's own measured densities."""
    macs = []
    with torch.no_grad():
        for lr in images.values():
            network.forward_sparse(lr * network.pixel_range)
            densities = [float(mask.double().sum()) / mask.numel() for mask in network.last_spatial]
            macs.append(analytic_macs_720p(network, densities)[0])
    return {"macs_720p": float(np.mean(macs)), "per_image": macs}


@pytest.mark.integration
def test_smsr_cost_is_per_set_and_reset_each_evaluation(tmp_path: Path) -> None:
    flat, noise = _write_set(tmp_path / "Flat", "flat", 3), _write_set(tmp_path / "Noise", "noise", 2)
    module = SMSRModule(TextureSMSR(scale=2), tile_above_pixels=-1)
    run = _test(module, [flat, noise], tmp_path / "both", scale=2)
    results, logged, lr = run["results"], run["logged"], _lr_images(run["datamodule"])
    network = module.network.eval()
    expected = {name: _expected_smsr(network, lr[name]) for name in ("Flat", "Noise")}
    assert expected["Flat"]["macs_720p"] < 0.8 * expected["Noise"]["macs_720p"]  # the content matters
    for name in ("Flat", "Noise"):
        row = results[name]
        assert row["n_images"] == len(lr[name]) == len(row["images"])
        assert row["macs_720p"] == pytest.approx(expected[name]["macs_720p"], rel=1e-9)
        assert [row["images"][image]["macs_720p"] for image in sorted(lr[name])] == pytest.approx(
            expected[name]["per_image"], rel=1e-9)
        assert logged[f"cost/{name}/macs_720p"] == pytest.approx(expected[name]["macs_720p"], rel=1e-6)
    every_image = expected["Flat"]["per_image"] + expected["Noise"]["per_image"]
    assert logged["cost/macs_720p"] == pytest.approx(np.mean(every_image), rel=1e-6)
    assert module.cost_report()["macs_720p"] == pytest.approx(np.mean(every_image), rel=1e-9)
    # A second evaluation on the noise set alone: nothing of the first one is mixed in.
    again = _test(module, [noise], tmp_path / "noise_only", scale=2)
    assert list(again["results"]) == ["Noise"]
    assert again["results"]["Noise"]["macs_720p"] == pytest.approx(expected["Noise"]["macs_720p"], rel=1e-9)
    assert again["logged"]["cost/macs_720p"] == pytest.approx(expected["Noise"]["macs_720p"], rel=1e-6)


def _brightness_classsr() -> ClassSRModule:
    """ClassSR whose classifier routes a patch by its mean value m: branch 0 if m < 0.3, 2 if m > 0.7, else 1."""
    torch.manual_seed(0)
    network = ClassSRNet(backbone="effsr.archs.MSRResNet", widths=[8, 12, 16], backbone_args={"num_blocks": 1},
                         scale=4)
    classifier = network.classifier
    with torch.no_grad():
        for parameter in classifier.parameters():
            parameter.zero_()
        classifier.features[0].weight[0].fill_(1.0 / 48)  # channel 0 = mean of each 4×4×3 block
        for layer in list(classifier.features)[2::2]:
            layer.weight[0, 0] = 1.0
        classifier.linear.weight[:, 0] = torch.tensor([-10.0, 0.0, 10.0])
        classifier.linear.bias.copy_(torch.tensor([3.0, 0.0, -7.0]))
    return ClassSRModule(network=network)


def _expected_classsr(module: ClassSRModule, images: dict[str, Tensor], branch_720p: list[int]) -> dict:
    """Patches per branch by the brightness rule on the tiling grid, and the routed cost at the set's shares from
    ``branch_720p`` (each branch's MACs at 720p, counted with effsr.cost) and the classifier's."""
    counts = np.zeros(3)
    for lr in images.values():
        for y, x in tile_grid(lr.shape[-2], lr.shape[-1], 32, 28):
            mean = float(lr[..., y:y + 32, x:x + 32].double().mean())
            counts[0 if mean < 0.3 else 2 if mean > 0.7 else 1] += 1
    shares = counts / counts.sum()
    classifier_patch = count_macs(module.network.classifier, torch.zeros(1, 3, 32, 32))
    tiles = len(tile_grid(180, 320, 32, 28))
    macs = float(sum(share * macs for share, macs in zip(shares, branch_720p, strict=True)) + tiles * classifier_patch)
    return {"counts": counts.tolist(), "shares": shares.tolist(), "macs_720p": macs,
            "percent_of_wide": 100 * macs / branch_720p[-1]}


@pytest.mark.integration
def test_classsr_shares_and_cost_are_per_set(tmp_path: Path) -> None:
    dark, halves = _write_set(tmp_path / "Dark", "flat", 2, (192, 320)), _write_set(tmp_path / "Halves", "halves", 2,
                                                                                    (192, 320))
    module = _brightness_classsr()
    run = _test(module, [dark, halves], tmp_path / "out", scale=4)
    results, lr = run["results"], _lr_images(run["datamodule"])
    # imported here, not at module level: the DDP test's `effsr test` children import this module for
    # TextureSMSR, and conftest strips launcher variables (LOCAL_RANK) from the environment when imported
    from conftest import macs_720p_by_area

    branch_720p = [macs_720p_by_area(branch, 4) for branch in module.network.branches]  # once for both sets
    expected = {name: _expected_classsr(module, lr[name], branch_720p) for name in ("Dark", "Halves")}
    assert expected["Dark"]["shares"] == [1.0, 0.0, 0.0] and min(expected["Halves"]["counts"]) > 0
    for name in ("Dark", "Halves"):
        row = results[name]
        assert row["class_counts"] == expected[name]["counts"]
        assert row["class_proportions"] == pytest.approx(expected[name]["shares"], abs=1e-12)
        assert row["macs_720p"] == pytest.approx(expected[name]["macs_720p"], rel=1e-9)
        assert row["macs_720p_percent_of_wide"] == pytest.approx(expected[name]["percent_of_wide"], rel=1e-9)
        assert run["logged"][f"cost/{name}/macs_720p"] == pytest.approx(expected[name]["macs_720p"], rel=1e-6)
    pooled = np.add(expected["Dark"]["counts"], expected["Halves"]["counts"])
    assert module.cost_proportions_used()[0] == pytest.approx((pooled / pooled.sum()).tolist())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return run_bounded([sys.executable, "-m", "effsr.cli", *args], timeout=300, cwd=cwd, env=env)


@pytest.mark.ddp
def test_ddp_test_gives_single_process_numbers_and_one_table(tmp_path: Path) -> None:
    """2-process gloo `effsr test` (uneven shards: 3 and 2 images) writes the same per-set rows as one process;
    the console shows effsr's table once, on its own lines, and not Lightning's per-dataloader table."""
    sets = [_write_set(tmp_path / "Flat", "flat", 3), _write_set(tmp_path / "Noise", "noise", 2)]
    config = tmp_path / "texture_smsr.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "trainer: {accelerator: cpu, devices: 1, logger: false, enable_model_summary: false}\n"
        "model:\n  class_path: effsr.methods.smsr.SMSRModule\n  init_args:\n"
        "    network: {class_path: test_eval_per_set.TextureSMSR}\n    tile_above_pixels: -1\n"
        f"data: {{scale: 2, val_sets: [], test_sets: [{sets[0]}, {sets[1]}], num_workers: 0}}\n"
    )
    rows = {}
    for label, extra in (("single", []), ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2"])):
        run = _cli("test", "--config", str(config), *extra, "--trainer.default_root_dir", str(tmp_path / label),
                   cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        rows[label] = json.loads((tmp_path / label / "test_results.json").read_text())
        lines = run.stdout.splitlines()
        assert sum(line.startswith("set ") and "GMACs@720p" in line for line in lines) == 1, run.stdout
        assert [line.split()[0] for line in lines if line.startswith(("Flat ", "Noise "))] == ["Flat", "Noise"]
        assert "DataLoader 0" not in run.stdout.replace("Testing DataLoader 0", "")
        assert "Test metric" not in run.stdout
    for name in ("Flat", "Noise"):
        single, ddp = rows["single"][name], rows["ddp"][name]
        assert ddp["n_images"] == single["n_images"] == len(single["images"])
        assert sorted(ddp["images"]) == sorted(single["images"])
        for key in ("psnr_y", "ssim_y", "psnr_rgb", "macs_720p", "spatial_density"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-9), key
    assert rows["single"]["Flat"]["macs_720p"] < rows["single"]["Noise"]["macs_720p"]


@pytest.mark.integration
def test_fit_prints_one_validation_line_per_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With `logger: false` the validation results still reach the console: one line, every set once."""
    flat, noise = _write_set(tmp_path / "Flat", "flat", 1), _write_set(tmp_path / "Noise", "noise", 1)
    datamodule = SRDataModule(scale=2, train="sample", val_sets=[str(flat), str(noise)], lr_patch_size=16,
                              batch_size=2, samples_per_epoch=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=2, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(SMSRModule(TextureSMSR(scale=2), tile_above_pixels=-1), datamodule=datamodule)
    lines = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().out.splitlines()]
    summaries = [line for line in lines if line.startswith("val step ")]
    assert len(summaries) == 1, lines
    assert summaries[0].startswith("val step 2 | Flat psnr_y ") and " | Noise psnr_y " in summaries[0]


@pytest.mark.integration
def test_y_metrics_are_computed_once_per_image_and_set_means_match(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation computes Y-PSNR/SSIM once per batch (the records and the torchmetrics states share them): the
    metrics' own SSIM/PSNR scoring never runs for Y, and each set's value is the mean of its per-image values."""
    import effsr.models.evaluation as evaluation
    from effsr.archs import BicubicSR
    from effsr.metrics import SSIM
    from effsr.models import SRModule

    calls = {"psnr": 0, "ssim": 0}

    def counting(name: str, function):  # noqa: ANN001, ANN202 - a thin spy
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    def refuse(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("SSIM scored a second time")

    monkeypatch.setattr(evaluation, "psnr_fn", counting("psnr", evaluation.psnr_fn))
    monkeypatch.setattr(evaluation, "ssim_fn", counting("ssim", evaluation.ssim_fn))
    monkeypatch.setattr(SSIM, "score_fn", staticmethod(refuse))
    first, second = _write_set(tmp_path / "Noise", "noise", 3), _write_set(tmp_path / "Halves", "halves", 2)
    data = SRDataModule(scale=2, test_sets=[str(first), str(second)], num_workers=0)
    module = SRModule(BicubicSR(scale=2), results_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path))
    trainer.test(module, datamodule=data, verbose=False)
    assert calls == {"psnr": 5, "ssim": 5}  # one batch per image, each scored once
    for name, count in (("Noise", 3), ("Halves", 2)):
        row = module.eval_results[name]
        images = list(row["images"].values())
        assert row["n_images"] == len(images) == count
        for key in ("psnr_y", "ssim_y"):
            assert abs(row[key] - sum(image[key] for image in images) / count) <= 1e-12
