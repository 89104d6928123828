"""PhaseSchedule: phases do what they declare, and a run killed mid-phase resumes exactly (1 and 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bounded_run import run_bounded

from effsr.cli import EffSRCLI
from effsr.errors import ConfigError
from effsr.phases import ParamSchedule, Phase, PhaseSchedule

TESTS = Path(__file__).parent
CONFIG = TESTS / "configs" / "toy_phases.yaml"
BATCH_CONFIG = TESTS / "configs" / "toy_batch_phases.yaml"


def _fit(root: Path, *extra: str, config: Path = CONFIG) -> EffSRCLI:
    sys.path.insert(0, str(TESTS))
    return EffSRCLI(args=["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra])


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return checkpoint["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), f"{key}: {(a[key] - b[key]).abs().max()}"


@pytest.mark.unit
def test_schedule_shapes() -> None:
    assert ParamSchedule("tau", 1.0, 0.4, "linear", 0, 100).value(50) == pytest.approx(0.7)
    assert ParamSchedule("tau", 1.0, 0.4, "linear", 0, 100).value(500) == pytest.approx(0.4)
    assert ParamSchedule("w", 1.0, 0.0, "cosine", 0, 10).value(5) == pytest.approx(0.5)
    assert ParamSchedule("w", 1.0, 0.01, "exponential", 0, 10).value(5) == pytest.approx(0.1)
    assert ParamSchedule("lr", 1.0, 0.2, "step", 0, step_size=10, gamma=0.5).value(25) == pytest.approx(0.25)
    assert ParamSchedule("lr", 1.0, 0.2, "step", 0, step_size=10, gamma=0.5).value(99) == pytest.approx(0.2)


@pytest.mark.integration
def test_each_phase_does_what_it_declares(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    cli = _fit(tmp_path / "run", "--trainer.callbacks+=toy_phases.PhaseRecorder",
               f"--trainer.callbacks.init_args.path={record}")
    records = json.loads(record.read_text())
    assert cli.trainer.global_step == 20
    by_phase: dict[str, list[dict]] = {}
    for item in records:
        by_phase.setdefault(item["phase"], []).append(item)
    assert [len(by_phase[name]) for name in ("tail_only", "shrink", "finetune")] == [6, 8, 6]
    tail_only = by_phase["tail_only"]
    assert all(item["trainable"] == ["tail.bias", "tail.weight"] for item in tail_only)
    assert all(item["optimized"] == 2 for item in tail_only)
    first, last = tail_only[0]["sums"], by_phase["shrink"][0]["sums"]
    assert first["head.weight"] == last["head.weight"]          # frozen: unchanged through the phase
    assert first["tail.weight"] != tail_only[-1]["sums"]["tail.weight"]
    assert all(item["body_out"] == 16 for item in tail_only)
    assert all(item["body_out"] == 8 for item in by_phase["shrink"] + by_phase["finetune"])
    assert all(item["optimized"] == 6 for item in by_phase["shrink"])  # the rebuilt optimizer has the new params
    assert all(item["lr"] == pytest.approx(1e-3) for item in by_phase["shrink"])
    assert all(item["lr"] == pytest.approx(5e-4) for item in by_phase["finetune"])
    assert by_phase["shrink"][1]["sums"]["head.weight"] != by_phase["shrink"][0]["sums"]["head.weight"]


@pytest.mark.e2e  # three CLI fits: straight, killed mid-phase, resumed
def test_killed_mid_phase_two_resumes_to_the_same_weights(tmp_path: Path) -> None:
    _fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated kill"):
        _fit(tmp_path / "killed", "--trainer.callbacks+=toy_phases.KillAtStep", "--trainer.callbacks.init_args.step=10")
    killed = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert killed["global_step"] == 8 and killed["effsr"]["phase_name"] == "shrink"
    assert killed["state_dict"]["network.body.weight"].shape[0] == 8
    _fit(tmp_path / "killed", "--ckpt_path", "last")
    _assert_same_weights(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed"))


def _ddp_fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "effsr.cli", "fit", "--config", str(CONFIG),
               "--trainer.default_root_dir", str(root),
               "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", *extra]
    return run_bounded(command, env=env, timeout=300)


@pytest.mark.ddp
def test_ddp_two_processes_phases_and_resume(tmp_path: Path) -> None:
    straight = _ddp_fit(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _ddp_fit(tmp_path / "killed", "--trainer.callbacks+=toy_phases.KillAtStep",
                      "--trainer.callbacks.init_args.step=10")
    assert killed.returncode != 0 and "simulated kill" in killed.stderr
    checkpoint = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["effsr"]["phase_name"] == "shrink" and 6 < checkpoint["global_step"] < 14
    resumed = _ddp_fit(tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed"))


# ----------------------------------------------------------------------------- per-phase batch size
def _batch_sizes(root: Path, *extra: str) -> tuple[EffSRCLI, dict[int, int]]:
    record = root / "batches.json"
    cli = _fit(root, "--trainer.callbacks+=toy_phases.BatchSizeRecorder",
               f"--trainer.callbacks.init_args.path={record}", *extra, config=BATCH_CONFIG)
    records = json.loads(record.read_text())
    assert all(lr == hr for _, lr, hr in records)
    return cli, {step: lr for step, lr, _ in records}


@pytest.mark.e2e  # three CLI fits: straight, killed, resumed
def test_phase_batch_size_changes_at_the_boundary_and_resumes(tmp_path: Path) -> None:
    cli, sizes = _batch_sizes(tmp_path / "straight")
    assert cli.trainer.global_step == 16
    # num_workers 0: exact at the boundaries (small 0-5 at data.batch_size 2, large 6-11 at 3, back 12-15 at 2)
    assert sizes == {step: 3 if 6 <= step < 12 else 2 for step in range(16)}
    assert cli.datamodule.train_batch_size == 2 and cli.datamodule.batch_size == 2
    assert cli.trainer.num_training_batches == 4  # the epoch length in steps follows data.batch_size

    with pytest.raises(RuntimeError, match="simulated kill"):
        _fit(tmp_path / "killed", "--trainer.callbacks+=toy_phases.KillAtStep", "--trainer.callbacks.init_args.step=10",
             config=BATCH_CONFIG)
    killed = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert killed["global_step"] == 8 and killed["effsr"]["phase_name"] == "large"
    resumed, resumed_sizes = _batch_sizes(tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 16
    assert resumed_sizes == {step: 3 if step < 12 else 2 for step in range(8, 16)}
    _assert_same_weights(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed"))


@pytest.mark.unit
@pytest.mark.parametrize("value", [0, -4, 2.5, "96", True])
def test_phase_batch_size_rejects_bad_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"phase 'classifier': settings.batch_size"):
        PhaseSchedule([Phase("branches", 5), Phase("classifier", 5, settings={"batch_size": value})])


@pytest.mark.unit
def test_phase_batch_size_needs_a_datamodule_with_set_batch_size() -> None:
    schedule = PhaseSchedule([Phase("branches"), Phase("classifier", settings={"batch_size": 96})])
    module = SimpleNamespace(phase_name=None, phase_settings={}, enter_phase=lambda name, settings: False,
                             on_phase_resumed=lambda name, settings: None, phase_condition=lambda name: False,
                             set_schedule_value=lambda name, value: None)  # effsr.phases.PhaseDriven
    with pytest.raises(ConfigError, match=r"phase 'classifier': settings.batch_size needs a data module"):
        schedule.setup(SimpleNamespace(datamodule=None, max_steps=-1), module, "fit")
    schedule.setup(SimpleNamespace(datamodule=None, max_steps=-1), module, "validate")


@pytest.mark.e2e  # two CLI fits: the pipeline, then a resume of its final checkpoint
def test_pipeline_ending_inside_an_epoch_writes_its_final_checkpoint(tmp_path: Path) -> None:
    """7 steps per epoch (14 samples, batch 2): epochs end at steps 7 and 14, the 20-step pipeline inside the third
    epoch, and max_steps 100 leaves the stop to PhaseSchedule. last.ckpt holds the finished run at step 20."""
    extra = ("--data.samples_per_epoch", "14", "--trainer.max_steps", "100")
    cli = _fit(tmp_path, *extra)
    assert cli.trainer.global_step == 20 and cli.trainer.num_training_batches == 7
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 20
    (state,) = [value for key, value in checkpoint["callbacks"].items() if "PhaseSchedule" in key]
    assert state["finished"] and state["index"] == 2
    assert [name for name, _ in state["history"]] == ["tail_only", "shrink", "finetune"]
    assert checkpoint["effsr"]["phase_name"] == "finetune"
    _assert_same_weights(checkpoint["state_dict"], {k: v.detach() for k, v in cli.model.state_dict().items()})
    resumed = _fit(tmp_path, *extra, "--ckpt_path", "last")  # a finished pipeline trains no further step
    assert resumed.trainer.global_step == 20
