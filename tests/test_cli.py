"""The `effsr` command end to end: W&B offline runs, re-runs, config errors, DDP metrics, predict, profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from effsr.checkpointing import AtomicCheckpointIO
from effsr.cli import EffSRCLI, main
from effsr.data.io import read_image, write_image
from effsr.errors import ConfigError, TrainingError
from effsr.models import SRModule

if TYPE_CHECKING:
    from conftest import CodePickle

TESTS = Path(__file__).parent
REPO = TESTS.parent
TINY = TESTS / "configs" / "tiny_edsr.yaml"


@pytest.mark.e2e
def test_wandb_offline_without_credentials_and_rerun_in_same_folder(
    tmp_path: Path, no_wandb_credentials: Path, capsys: pytest.CaptureFixture[str],
    wandb_summary: Callable[[Path], dict]
) -> None:
    root = tmp_path / "run"
    args = ["fit", "--config", str(TINY), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root)]
    EffSRCLI(args=args)
    assert "W&B runs offline" in capsys.readouterr().err
    assert os.environ["WANDB_MODE"] == "offline"
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_summary(runs[0])
    metrics = json.dumps(summary)
    assert "val/sample/psnr_y" in metrics and "cost/macs_720p" in metrics
    assert "effsr_config" in metrics  # the resolved config is attached to the run
    EffSRCLI(args=args)  # a second run in the same folder (existing config.yaml) must not crash
    assert len(sorted((root / "wandb").glob("offline-run-*"))) == 2


_NOISE = (
    "args parameter is intended",  # LightningCLI: args given while sys.argv is set
    "Unable to serialize instance",  # jsonargparse: a CheckpointIO instance in the trainer defaults
    "litlogger", "💡 Tip",  # Lightning's ads
    "on_after_batch_transfer",  # Lightning: which of the model's / datamodule's hooks it calls
    "LeafSpec",  # torch deprecation inside Lightning
    "anonymous setting",  # wandb: Lightning's anonymous=None
    "git root",  # wandb: the logger's save dir did not exist yet
)


@pytest.mark.e2e
def test_console_output_is_free_of_known_noise(tmp_path: Path, no_wandb_credentials: Path) -> None:
    """`effsr fit` of the tiny SMSR experiment (relative W&B save dir, phase schedule) prints the useful lines
    only; its dumped config.yaml loads again."""
    config = REPO / "experiments" / "tiny" / "smsr_x2.yaml"
    command = [sys.executable, "-m", "effsr.cli", "fit", "--config", str(config), "--trainer.max_steps", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[effsr] W&B runs offline" in output
    assert "[effsr] phase 1/1 'train' starts at step 0" in output
    assert "wandb sync" in output
    for noise in _NOISE:
        assert noise not in output, f"{noise!r} in the output:\n{output[-5000:]}"
    dumped = tmp_path / "runs" / "tiny_smsr_x2" / "config.yaml"
    reload = subprocess.run([*command[:4], "--config", str(dumped), "--print_config"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert "SMSRModule" in reload.stdout and "plugins: null" in reload.stdout


@pytest.mark.unit
@pytest.mark.parametrize("plugins", [[], ["lightning.fabric.plugins.environments.LightningEnvironment"],
                                     ["lightning.pytorch.plugins.io.TorchCheckpointIO"],
                                     ["lightning.pytorch.plugins.io.AsyncCheckpointIO"]])
def test_checkpoints_are_atomic_whatever_the_plugins(plugins: list[str]) -> None:
    plugin_args = [f"--trainer.plugins+={plugin}" for plugin in plugins]
    cli = EffSRCLI(args=["--config", str(TINY), "--trainer.logger=false", *plugin_args], run=False)
    checkpoint_io = cli.trainer.strategy.checkpoint_io
    checkpoint_io = getattr(checkpoint_io, "checkpoint_io", checkpoint_io)  # AsyncCheckpointIO wraps the writer
    assert isinstance(checkpoint_io, AtomicCheckpointIO)


@pytest.mark.e2e
def test_config_typo_names_the_option(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "effsr.cli", "fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path),
         "--model.init_args.network.init_args.num_featurs", "8"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "num_featurs" in result.stderr


def _last_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.integration
@pytest.mark.parametrize(("option", "expected"), [
    ("--model.init_args.sparsity_wieght", "option model.init_args.sparsity_wieght is not accepted by "
     "effsr.methods.smsr.SMSRModule; did you mean model.init_args.sparsity_weight"),
    ("--model.init_args.network.init_args.num_featurs", "option model.init_args.network.init_args.num_featurs is "
     "not accepted by effsr.methods.smsr.SMSR; did you mean model.init_args.network.init_args.num_features"),
    ("--trainer.max_stepz", "option trainer.max_stepz is not accepted by `effsr fit`; did you mean trainer.max_steps"),
])
def test_option_typo_is_the_last_line_with_the_closest_names(option: str, expected: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--config", "tiny/smsr_x2", option, "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[-1].startswith(f"effsr: error: {expected}")  # no usage dump before it


@pytest.mark.integration
def test_missing_member_checkpoint_names_the_file_and_its_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "nm_adaptive_x4", "--trainer.logger=false"]
    assert main(args) == 2
    assert _last_error_line(capsys) == (
        "effsr: error: model.init_args.checkpoints[0]: checkpoint runs/nm_carn_x4_budget1.0/last.ckpt does not exist; "
        "train it with: effsr fit --config experiments/nm_carn_x4.yaml --model.init_args.budget 1.0 "
        "--trainer.logger.init_args.save_dir runs/nm_carn_x4_budget1.0, then copy the run's checkpoints/last.ckpt "
        "to runs/nm_carn_x4_budget1.0/last.ckpt")
    (tmp_path / "runs" / "nm_carn_x4_budget1.0").mkdir(parents=True)
    (tmp_path / "runs" / "nm_carn_x4_budget1.0" / "last.ckpt").touch()  # the first member exists: the next one
    assert main(args) == 2
    assert "checkpoints[1]: checkpoint runs/nm_carn_x4_budget0.5/last.ckpt does not exist" in _last_error_line(capsys)
    assert main(["fit", "--config", "tiny/nm_x4", "--model.init_args.dense_checkpoint", "dense.ckpt"]) == 2
    assert _last_error_line(capsys).startswith(
        "effsr: error: model.init_args.dense_checkpoint: checkpoint dense.ckpt does not exist")
    assert main(["fit", "--config", "tiny/classsr_x4", "--model.init_args.branches_checkpoint", "run.ckpt"]) == 2
    assert _last_error_line(capsys).startswith(
        "effsr: error: model.init_args.branches_checkpoint: checkpoint run.ckpt does not exist")


@pytest.mark.integration
def test_no_arguments_lists_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    output = capsys.readouterr().out
    assert "effsr fit --config" in output
    assert any(line.split()[:4] == ["bicubic", "x2", "x3", "x4"] for line in output.splitlines())


@pytest.mark.e2e
def test_wheel_ships_the_experiment_configs(tmp_path: Path) -> None:
    """A wheel built from the sources holds every YAML of experiments/ under effsr/experiments/."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "effsr", source / "effsr", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "experiments", source / "experiments", ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("effsr-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {f"effsr/experiments/{path.relative_to(REPO / 'experiments').as_posix()}"
                for path in (REPO / "experiments").rglob("*.yaml")}
    assert expected and expected <= shipped
    assert {"effsr/experiments/smsr_x4.yaml", "effsr/experiments/tiny/smsr_x2.yaml",
            "effsr/experiments/trainer/ddp.yaml", "effsr/configs/demo.yaml"} <= shipped


@pytest.mark.integration
def test_packaged_configs_by_name_from_a_folder_without_experiments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from effsr.cli_support import PACKAGED_EXPERIMENTS, resolve_config, resolve_config_args

    monkeypatch.chdir(tmp_path)
    packaged = str(PACKAGED_EXPERIMENTS / "smsr_x4.yaml")
    assert resolve_config("smsr_x4") == resolve_config("smsr_x4.yaml") == packaged
    assert resolve_config("experiments/smsr_x4.yaml") == packaged  # the paths of the docs work from anywhere
    args = ["fit", "--config", "tiny/smsr_x2", "--config=trainer/ddp", "-c", "bicubic_x4"]
    assert resolve_config_args(args) == [  # a composed config comes after its base
        "fit", "--config", str(PACKAGED_EXPERIMENTS / "tiny" / "smsr_x2.yaml"),
        f"--config={PACKAGED_EXPERIMENTS / 'trainer' / 'ddp.yaml'}",
        "-c", str(PACKAGED_EXPERIMENTS / "recipes" / "bicubic.yaml"),
        "-c", str(PACKAGED_EXPERIMENTS / "bicubic_x4.yaml")]
    (tmp_path / "smsr_x4").write_text("{}")  # an existing file wins over the packaged name
    assert resolve_config("smsr_x4") == "smsr_x4"
    with pytest.raises(ConfigError, match=r"no packaged experiment 'smsr_x5'. Did you mean smsr_x4"):
        resolve_config("smsr_x5")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "tiny/smsr_x2", "--config", "trainer/ddp_cpu", "--print_config"])
    printed = capsys.readouterr().out
    assert "SMSRModule" in printed and "strategy: ddp" in printed and "devices: 2" in printed
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert str(PACKAGED_EXPERIMENTS) in listing and "--config smsr_x4" in listing
    assert any(line.split()[:1] == ["tiny/:"] and "smsr_x2" in line.split() for line in listing.splitlines())


@pytest.fixture
def restore_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.unit
def test_threads_option_then_omp_num_threads_then_torch_default(
    restore_threads: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from effsr.cli_support import apply_thread_count

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    EffSRCLI(args=["--config", str(TINY), "--trainer.logger=false", "--threads", "2"], run=False)
    assert torch.get_num_threads() == 2
    assert "[effsr] 2 CPU threads (--threads)" in capsys.readouterr().out
    assert apply_thread_count(None) == (1, "OMP_NUM_THREADS") and torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(restore_threads)
    count, why = apply_thread_count(None)
    assert count == restore_threads and why.startswith("torch's default")
    assert capsys.readouterr().out.count("[effsr]") == 2
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        apply_thread_count(0)


@pytest.mark.e2e
def test_sigterm_exits_nonzero_and_last_checkpoint_resumes(tmp_path: Path) -> None:
    """`kill <pid>` of a running `effsr fit`: exit 143 (not 0), and `--ckpt_path last` resumes the run."""
    root = tmp_path / "run"
    common = ["fit", "--config", str(TINY), "--trainer.logger=false", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.default_root_dir", str(root)]
    last = root / "checkpoints" / "last.ckpt"
    with open(tmp_path / "out.txt", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "effsr.cli", *common, "--trainer.max_steps=1000000"],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 240
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert last.exists(), (tmp_path / "out.txt").read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    output = (tmp_path / "out.txt").read_text()
    assert returncode == 143, output[-3000:]
    assert "stopped by SIGTERM" in output
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step > 0 and step % 4 == 0  # an epoch-end checkpoint (4 steps per epoch)
    resumed = EffSRCLI(args=[*common, f"--trainer.max_steps={step + 4}", "--ckpt_path", "last"])  # in-process: faster
    assert resumed.trainer.global_step == step + 4
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step + 4


class _NaNNet(torch.nn.Module):
    scale, pixel_range = 2, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=2) * float("nan")


@pytest.mark.integration
def test_nan_loss_stops_with_a_clear_message() -> None:
    module = SRModule(_NaNNet())
    batch = {"lr": torch.rand(1, 3, 8, 8), "hr": torch.rand(1, 3, 16, 16)}
    with pytest.raises(TrainingError, match="non-finite training loss.*--ckpt_path last"):
        module.training_step(batch, 0)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effsr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "WANDB_MODE": "offline"})


def _write_hr_set(folder: Path, count: int) -> Path:
    from skimage import data

    folder.mkdir(parents=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    for index in range(count):
        image = photos[index % len(photos)][: 96 + 12 * index, : 120 - 6 * index]
        write_image(folder / f"img{index}.png", np.ascontiguousarray(image))
    return folder


@pytest.mark.ddp
def test_ddp_checkpoint_and_metrics_match_single_process(tmp_path: Path) -> None:
    hr_set = _write_hr_set(tmp_path / "OddSet", 5)
    common = ["--config", str(TINY), "--trainer.logger=false", f"--data.test_sets=[{hr_set}]"]
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    fit = _run("fit", *common, *ddp, "--trainer.default_root_dir", str(tmp_path / "fit"), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    results = {}
    for label, extra in (("single", []), ("ddp", ddp)):
        out = tmp_path / label
        run = _run("test", *common, *extra, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(out),
                   cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        results[label] = json.loads((out / "test_results.json").read_text())
    single, ddp_results = results["single"]["OddSet"], results["ddp"]["OddSet"]
    assert single["n_images"] == ddp_results["n_images"] == 5
    assert sorted(single["images"]) == sorted(ddp_results["images"])
    for key in ("psnr_y", "ssim_y", "psnr_rgb"):
        assert ddp_results[key] == pytest.approx(single[key], abs=1e-9)
    assert single["psnr_y"] == pytest.approx(np.mean([v["psnr_y"] for v in single["images"].values()]), abs=1e-9)


@pytest.mark.e2e
def test_predict_tiles_large_images_and_writes_pngs(tmp_path: Path) -> None:
    from skimage import data

    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    write_image(lr_dir / "coffee.png", np.ascontiguousarray(data.coffee()[:150, :170]))
    out = tmp_path / "sr"
    run = _run("predict", "--config", str(TINY), "--trainer.logger=false", f"--data.predict_path={lr_dir}",
               "--model.init_args.tile_above_pixels=4096", "--model.init_args.tile_size=48",
               "--trainer.default_root_dir", str(tmp_path), f"--output_dir={out}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_image(out / "coffee.png").shape == (300, 340, 3)


@pytest.mark.e2e
def test_profile_edsr_baseline_json(tmp_path: Path) -> None:
    run = _run("profile", "--config", str(REPO / "experiments" / "edsr_baseline_x4.yaml"), "--json", "--runs", "1",
               "--lr_size", "24", "24", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["params"] == pytest.approx(1.52e6, rel=0.01)
    assert report["macs_720p"] > 100e9


@pytest.mark.e2e
def test_profile_reads_a_runs_own_config_and_checkpoint(tmp_path: Path) -> None:
    """`effsr profile --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt` after `effsr fit` (the saved
    config holds `ckpt_path`), weights loaded through effsr.weights."""
    from effsr.cli import load_module_from_config

    root = tmp_path / "run"
    EffSRCLI(args=["fit", "--config", str(TINY), "--trainer.logger=false", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.default_root_dir", str(root)])
    config, checkpoint = root / "config.yaml", root / "checkpoints" / "last.ckpt"
    assert "ckpt_path" in config.read_text()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module = load_module_from_config(["--config", str(config)], str(checkpoint))
    assert module.state_dict().keys() == saved.keys()
    assert all(torch.equal(module.state_dict()[key], value) for key, value in saved.items())
    report_path = tmp_path / "profile.json"
    assert main(["profile", "--config", str(config), "--ckpt_path", str(checkpoint), "--runs", "1",
                 "--lr_size", "16", "16", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["params"] == sum(value.numel() for key, value in saved.items() if key.startswith("network."))


@pytest.mark.integration
def test_profile_loads_the_checkpoint_safely(tmp_path: Path, code_pickle: CodePickle) -> None:
    """`effsr profile`'s model loader (load_module_from_config) reads --ckpt_path through the safe loader: the
    weights of a checkpoint load, and the same checkpoint with a pickle that needs code is refused, unrun."""
    from effsr.cli import load_module_from_config
    from effsr.errors import CheckpointError

    torch.manual_seed(1)
    weights = EffSRCLI(args=["--config", str(TINY), "--trainer.logger=false"], run=False).model.state_dict()
    good, evil = tmp_path / "good.ckpt", tmp_path / "evil.ckpt"
    torch.save({"state_dict": weights}, good)
    module = load_module_from_config(["--config", str(TINY)], str(good))
    assert module.state_dict().keys() == weights.keys()
    assert all(torch.equal(module.state_dict()[key], value) for key, value in weights.items())
    torch.save({"state_dict": weights, "hook": code_pickle}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load --ckpt_path '.*evil.ckpt'"):
        load_module_from_config(["--config", str(TINY)], str(evil))
    assert not code_pickle.ran


def _conventions_sets() -> list[Path]:
    """Set5/Set14 of the protocol's reference table when ``$EFFSR_BENCHMARK_SETS`` names a folder holding both
    (tests never look outside the repository on their own); else none, and the test uses a generated set."""
    root = Path(os.environ["EFFSR_BENCHMARK_SETS"]) if os.environ.get("EFFSR_BENCHMARK_SETS") else None
    if root is not None and (root / "Set5").is_dir() and (root / "Set14").is_dir():
        return [root / "Set5", root / "Set14"]
    return []


@pytest.mark.ddp
def test_bicubic_x4_config_reproduces_table_and_ddp_is_identical(tmp_path: Path) -> None:
    """`effsr test` of experiments/bicubic_x4.yaml: docs/protocol.md's table (when Set5/Set14 are here, else a
    generated set checked against the functional metrics in float64), and 2-process DDP gives identical numbers."""
    from effsr.metrics import psnr, ssim
    from effsr.ops import bicubic_degrade, imresize

    sets = _conventions_sets() or [_write_hr_set(tmp_path / "OddSet", 5)]
    test_sets = f"--data.test_sets=[{','.join(map(str, sets))}]"
    common = ["--config", str(REPO / "experiments" / "bicubic_x4.yaml"), test_sets]
    results = {}
    for label, extra in (("single", []), ("ddp", ["--trainer.strategy=ddp", "--trainer.devices=2",
                                                  "--trainer.accelerator=cpu"])):
        run = _run("test", *common, *extra, "--trainer.default_root_dir", str(tmp_path / label), cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        results[label] = json.loads((tmp_path / label / "test_results.json").read_text())
    for folder in sets:
        single, ddp_results = results["single"][folder.name], results["ddp"][folder.name]
        assert single["n_images"] == ddp_results["n_images"] == len(list(folder.glob("*.png")))
        for key in ("psnr_y", "ssim_y", "psnr_rgb"):
            assert ddp_results[key] == pytest.approx(single[key], abs=1e-9)
    if _conventions_sets():
        table = {"Set5": (28.43, 0.8113), "Set14": (26.09, 0.7050)}
        for name, (expected_psnr, expected_ssim) in table.items():
            assert results["single"][name]["psnr_y"] == pytest.approx(expected_psnr, abs=0.01)
            assert results["single"][name]["ssim_y"] == pytest.approx(expected_ssim, abs=0.001)
    else:
        for path in sorted(sets[0].glob("*.png")):
            hr, lr = bicubic_degrade(read_image(path), 4)
            to_tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255  # noqa: E731
            sr = imresize(to_tensor(lr), scale=4)
            expected = results["single"][sets[0].name]["images"][path.stem]
            assert expected["psnr_y"] == pytest.approx(psnr(sr, to_tensor(hr), 4, True).item(), abs=1e-3)
            assert expected["ssim_y"] == pytest.approx(ssim(sr, to_tensor(hr), 4, True).item(), abs=1e-5)


@pytest.mark.integration
def test_repeated_test_runs_keep_earlier_results(tmp_path: Path) -> None:
    """A second `effsr test` into the same folder keeps the first run's test_results.json in the history."""
    from effsr.archs import BicubicSR
    from effsr.models import SRModule

    module = SRModule(BicubicSR(scale=2), results_dir=str(tmp_path))
    row = {"n_images": 1, "psnr_y": 30.0, "ssim_y": 0.9, "psnr_rgb": 29.0}
    module._write_results({"Set5": row})
    module._write_results({"Set5": {**row, "psnr_y": 31.0}})
    module._write_results({"Set5": {**row, "psnr_y": 32.0}})
    assert json.loads((tmp_path / "test_results.json").read_text())["Set5"]["psnr_y"] == 32.0
    kept = sorted((tmp_path / "test_results_history").glob("test_results-*.json"))
    assert sorted(json.loads(path.read_text())["Set5"]["psnr_y"] for path in kept) == [30.0, 31.0]
    assert not list(tmp_path.glob("*.tmp"))
