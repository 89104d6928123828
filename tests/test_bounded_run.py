"""The test helper for process trees: a timeout kills the child's whole tree, not only the child."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from bounded_run import run_bounded

pytestmark = pytest.mark.unit


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie), read from Linux's /proc as CI runs on Linux."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def test_timeout_kills_the_grandchild(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    parent = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    for timeout in (1.5, 15):  # the longer one only if a slow machine had not started the grandchild in time
        with pytest.raises(subprocess.TimeoutExpired):
            run_bounded([sys.executable, "-c", parent], timeout=timeout)
        if pid_file.exists() and pid_file.read_text():
            break
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_completed_run_returns_output_and_code() -> None:
    run = run_bounded([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=30)
    assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")
