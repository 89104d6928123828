"""Collective-order checks that need no process group: a rank-0-only guard must not skip a call that is a
collective under DDP (Lightning's ``Trainer.log_dir`` broadcasts), or the ranks' next collectives pair wrongly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from effsr.methods.classsr import module as classsr_module
from effsr.methods.classsr.module import ClassSRModule

pytestmark = pytest.mark.unit


class _CountingTrainer:
    """A trainer whose ``log_dir`` counts its reads, each of which is a broadcast under DDP."""

    def __init__(self, root: Path) -> None:
        self.default_root_dir = str(root)
        self.log_dir_reads = 0

    @property
    def log_dir(self) -> str:
        self.log_dir_reads += 1
        return self.default_root_dir


@pytest.mark.parametrize("export_backbones", [True, False])
def test_classsr_export_reads_log_dir_on_a_non_zero_rank_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_backbones: bool
) -> None:
    """``_export`` on rank 1 makes the same ``trainer.log_dir`` broadcast as rank 0 (which exports), then returns
    without writing; before the fix rank 1 skipped it and its split-score broadcast received rank 0's path."""
    trainer = _CountingTrainer(tmp_path)
    stub = SimpleNamespace(export_backbones=export_backbones, _trainer=trainer, trainer=trainer)
    monkeypatch.setattr(classsr_module, "rank", lambda: 1)
    ClassSRModule._export(stub, "reference", 2)
    assert trainer.log_dir_reads == (1 if export_backbones else 0)  # rank 0 reads it once when it exports
    assert list(tmp_path.iterdir()) == []
