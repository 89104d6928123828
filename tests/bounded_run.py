"""``subprocess.run`` for commands that start process trees (DDP launches, the reproduction harness).

The child runs in its own session, so a timeout kills the whole tree (the launcher's rank processes, their
data workers, W&B's service) instead of only the direct child, and a hung DDP test cannot leave processes
that load the machine for the rest of the suite. Import-safe for subprocess children: no side effects.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_bounded(command: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``command`` to completion like ``subprocess.run(..., capture_output=True, text=True)``; on timeout
    (or any interruption) kill its process group and re-raise. Stragglers of a finished run are killed too."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        _kill_group(process)
        process.communicate()
        raise
    _kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
