"""ASSL deploy path and its speed benchmark: the per-device channel multiple, the interleaved timing protocol.

The fused network's exactness (deployed == plain network to float rounding) is tested in tests/test_assl.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from effsr.errors import ConfigError
from effsr.methods.assl import num_kept
from effsr.methods.assl.deploy import hardware_channel_multiple

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _assl_speed(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/assl_speed.py as a module (registered while the test runs: its dataclass needs that)."""
    spec = importlib.util.spec_from_file_location("assl_speed_under_test", REPO / "benchmarks" / "assl_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("capability", "multiple"), [("AVX512", 16), ("AVX2", 8), ("SVE256", 8), ("DEFAULT", 4)])
def test_cpu_channel_multiple_is_the_float32_vector_width(monkeypatch: pytest.MonkeyPatch, capability: str,
                                                          multiple: int) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert hardware_channel_multiple("cpu") == hardware_channel_multiple(torch.device("cpu")) == multiple


def test_channel_multiple_for_gpus_and_unknown_devices() -> None:
    assert hardware_channel_multiple("cuda") == hardware_channel_multiple("cuda:1") == 8
    with pytest.raises(ConfigError, match="keep_multiple_of"):
        hardware_channel_multiple("meta")
    # every documented multiple rounds the paper's 49 of 256 to 48
    assert {num_kept(256, keep=49, multiple_of=multiple) for multiple in (4, 8, 16)} == {48}


class _Clock:
    """Wall and CPU clocks that only the stub networks advance."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0


class _Stub(nn.Module):
    """Advances the clock by the next (wall, cpu) seconds of its script and logs its name."""

    def __init__(self, name: str, clock: _Clock, log: list[str], script: list[tuple[float, float]]) -> None:
        super().__init__()
        self.name, self.clock, self.log, self.script = name, clock, log, iter(script)

    def forward(self, x: Tensor) -> Tensor:
        wall, cpu = next(self.script)
        self.clock.wall += wall
        self.clock.cpu += cpu
        self.log.append(self.name)
        return x


def test_interleaved_timing_alternates_models_and_reports_medians_without_the_warm_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _assl_speed(monkeypatch)
    clock, log = _Clock(), []
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.wall, process_time=lambda: clock.cpu))
    # warm-ups: dense 1.0 s, a 0.25 s (→ 4 runs per round), b 0.5 s (→ 2), c 0.01 s (→ 100, capped at 5)
    dense = _Stub("dense", clock, log, [(1.0, 2.0), (1.0, 2.0), (9.0, 9.0), (2.0, 3.0)])
    a = _Stub("a", clock, log, [(0.25, 0.5)] + [(0.2, 0.4)] * 11 + [(7.0, 7.0)])
    b = _Stub("b", clock, log, [(0.5, 1.0), (0.3, 0.6), (0.4, 0.8), (0.5, 1.0), (0.6, 1.2), (0.7, 1.4), (0.8, 1.6)])
    c = _Stub("c", clock, log, [(0.01, 0.02)] * 16)
    dense_time, times = bench.interleaved_timing(dense, {"a": a, "b": b, "c": c}, torch.zeros(1), rounds=3,
                                                 max_compact_runs=5)
    one_round = ["dense", *"aaaa", *"bb", *"ccccc"]
    assert log == ["dense", "a", "b", "c", *itertools.chain.from_iterable([one_round] * 3)]
    assert dense_time == bench.Timing(pytest.approx(2000.0), pytest.approx(3000.0))  # median of 1, 9, 2 s
    assert times["a"] == bench.Timing(pytest.approx(200.0), pytest.approx(400.0))  # the 7 s outlier is dropped
    assert times["b"] == bench.Timing(pytest.approx(550.0), pytest.approx(1100.0))  # median of 0.3 ... 0.8 s
    assert times["c"] == bench.Timing(pytest.approx(10.0), pytest.approx(20.0))


def test_wait_policy_passive_unless_the_environment_or_the_option_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _assl_speed(monkeypatch)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    bench.set_wait_policy(None)
    assert bench.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    bench.set_wait_policy(None)
    assert bench.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    bench.set_wait_policy("passive")
    assert bench.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    bench.set_wait_policy("default")
    assert "OMP_WAIT_POLICY" not in bench.os.environ
