"""Early checks of the checkpoint files a config names, before any model is built."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from effsr.cli_support.configs import packaged_config_names
from effsr.errors import CheckpointError


def member_training_command(path: str) -> str | None:
    """The command that writes a member checkpoint named by effsr's convention
    ``runs/<experiment>_budget<B>/last.ckpt`` (an N:M run of ``experiments/<experiment>.yaml`` at budget B)."""
    match = re.fullmatch(r"(?:.*/)?([A-Za-z0-9_]+)_budget([0-9.]+)/last\.ckpt", path)
    if not match or match.group(1) not in packaged_config_names():
        return None
    experiment, budget = match.groups()
    run_dir = str(Path(path).parent)
    return (f"effsr fit --config experiments/{experiment}.yaml --model.init_args.budget {budget} "
            f"--trainer.logger.init_args.save_dir {run_dir}, then copy the run's checkpoints/last.ckpt to {path}")


def check_checkpoint_paths(init_args: Any, config_files: list[str]) -> None:
    """Stops before any model is built when a checkpoint file the model config names is missing.

    Covers ``checkpoints`` (members of an ensemble, ``null`` = none), ``dense_checkpoint`` and ClassSR's
    ``reference_checkpoint`` / ``branches_checkpoint``; the message names the option, the file and the command
    that writes it.
    """
    def get(key: str) -> Any:
        return init_args.get(key) if hasattr(init_args, "get") else getattr(init_args, key, None)

    named = [(f"model.init_args.checkpoints[{i}]", path) for i, path in enumerate(get("checkpoints") or [])]
    named += [(f"model.init_args.{key}", get(key))
              for key in ("dense_checkpoint", "reference_checkpoint", "branches_checkpoint")]
    source = f" (the header of {config_files[-1]} says how each is trained)" if config_files else ""
    for option, path in named:
        if not path or not isinstance(path, str) or Path(path).is_file():
            continue
        command = member_training_command(path)
        make = f"train it with: {command}" if command else f"train it first or fix the path{source}"
        raise CheckpointError(f"{option}: checkpoint {path} does not exist; {make}")
