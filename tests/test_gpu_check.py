"""benchmarks/gpu_check.py stays runnable without a GPU: ``--smoke`` runs every figure's code on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_mask_2to4_keeps_the_two_largest_magnitudes_of_every_four_inputs() -> None:
    gpu_check = _load_gpu_check()
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, -0.2, 0.3, -5.0]])
    assert gpu_check.mask_2to4(weight).tolist() == [[0.0, -3.0, 2.0, 0.0, 4.0, 0.0, 0.0, -5.0]]


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke run's skipped CUDA-only lines")
def test_smoke_run_measures_every_figure_on_cpu_and_skips_cuda_only_ones(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load_gpu_check()
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--json", str(output), "--configs", "experiments/edsr_baseline_x4.yaml"]) == 0
    report = json.loads(output.read_text())
    figures = {record["name"]: record for record in report["figures"]}
    assert list(figures) == ["smsr", "classsr", "nm_2to4_w64", "nm_2to4_w256", "assl",
                             "train/edsr_baseline_x4/32-true", "train/edsr_baseline_x4/bf16-mixed"]
    printed = capsys.readouterr().out.splitlines()
    for name, record in figures.items():  # one printed line per figure, the one recorded
        assert f"{name}: {record['line']}" in printed
    assert figures["nm_2to4_w64"]["status"] == figures["nm_2to4_w256"]["status"] == "skipped (no CUDA)"
    assert all(record["status"] == "ok" for name, record in figures.items() if not name.startswith("nm_"))
    # The timed variants compute the same thing: sparse SMSR = its hard-mask forward (pixel range 255),
    # ClassSR routed = the per-patch loop, the im2col matmul = the conv.
    assert figures["smsr"]["max_abs_diff_sparse_vs_hard"] < 1e-2
    assert figures["classsr"]["max_abs_diff_routed_vs_per_patch"] < 1e-5
    assert figures["nm_2to4_w64"]["max_abs_diff_matmul_vs_conv"] < 1e-3
    assert sum(figures["classsr"]["class_shares"]) == pytest.approx(1.0)
    assert figures["assl"]["params"][1] < figures["assl"]["params"][0]
    for precision in ("32-true", "bf16-mixed"):
        train = figures[f"train/edsr_baseline_x4/{precision}"]
        assert (train["batch_size"], train["lr_patch"], train["timed_steps"]) == (1, 8, report["steps"] - 1)
        assert train["it_per_s"] > 0 and train["peak_mem_gib"] is None
