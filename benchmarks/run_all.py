"""Runs every benchmark script of effsr in turn (``make bench``); each prints its own measured ratios.

Results and the commands that produced them are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SHARED = HERE.parent.parent / "shared" / "data" / "benchmarks"


def main() -> int:
    scripts = sorted(path for path in HERE.glob("*.py") if not path.name.startswith(("_", "run_all")))
    failures = 0
    for script in scripts:
        arguments = [sys.executable, str(script)]
        if script.name == "compare_methods.py":  # a report over the harness's cached runs (docs/comparison.md)
            print(f"== {script.name}: skipped (needs reproduce.py runs; see docs/comparison.md)")
            continue
        if script.name == "classsr_routing.py":  # a study of a trained ClassSR run (docs/reproduction.md)
            print(f"== {script.name}: skipped (needs a trained ClassSR run: --ckpt_path RUN/checkpoints/last.ckpt)")
            continue
        if script.name == "bicubic_baseline.py":
            if not SHARED.is_dir():
                print(f"== {script.name}: skipped (needs HR folders, e.g. --hr-dir Set5 Set14)")
                continue
            arguments += ["--hr-dir", str(SHARED / "Set5"), str(SHARED / "Set14"), "--all-scales"]
        print(f"== {' '.join(arguments[1:])}", flush=True)
        failures += subprocess.run(arguments).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
