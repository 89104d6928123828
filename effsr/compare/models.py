"""What ``effsr compare`` evaluates: model arguments parsed into :class:`ModelSpec` (name, kind, files).

A model argument is ``[NAME=]MODEL`` where MODEL is

- an effsr checkpoint ``RUN/checkpoints/last.ckpt``: its config is the ``config.yaml`` that ``effsr fit`` writes
  into the run folder (looked up beside the checkpoint and up to two folders above it), or is given explicitly
  as ``CKPT@CONFIG.yaml``;
- an experiment config ``X.yaml`` (evaluated as it is built: untrained, or parameter-free like bicubic);
- the word ``bicubic`` (the MATLAB-bicubic baseline).

Without ``NAME=`` the name is derived: the run folder of a checkpoint (``RUN``, or ``RUN/<stem>`` for a
checkpoint other than ``last.ckpt``), the stem of a config, ``bicubic``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from effsr.errors import CheckpointError, ConfigError

__all__ = ["BICUBIC_CONFIG", "ModelSpec", "find_run_config", "parse_models"]

BICUBIC_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_bicubic.yaml"
ModelKind = Literal["checkpoint", "config", "bicubic"]
_NAME = re.compile(r"^[A-Za-z0-9_.+:-]+$")
_CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: its display name, what it is and the files it is built from."""

    name: str
    kind: ModelKind
    source: str
    configs: tuple[Path, ...] = ()
    checkpoint: Path | None = None

    def config_args(self) -> list[str]:
        """``--config`` arguments of the effsr CLI for this model."""
        return [item for config in self.configs for item in ("--config", str(config))]


def find_run_config(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``checkpoint``: beside it or up to two folders above."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _split_name(text: str) -> tuple[str | None, str]:
    """``NAME=MODEL`` → (NAME, MODEL). A ``=`` inside a path (after a ``/``, or in an existing file's name such
    as Lightning's ``epoch=0-step=4.ckpt``) is not a name separator."""
    if Path(text.partition("@")[0]).expanduser().is_file():
        return None, text
    head, separator, tail = text.partition("=")
    if separator and tail and _NAME.match(head) and "/" not in head:
        return head, tail
    return None, text


def _checkpoint_name(checkpoint: Path) -> str:
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run.name if checkpoint.stem == "last" else f"{run.name}/{checkpoint.stem}"


def _existing(path: Path, what: str, argument: str) -> Path:
    if not path.is_file():
        error = CheckpointError if what == "checkpoint" else ConfigError
        raise error(f"model {argument!r}: {what} file {path} does not exist; check the path.")
    return path.resolve()


def parse_model(argument: str) -> ModelSpec:
    """One ``[NAME=]MODEL`` argument (module docstring) as a :class:`ModelSpec`; missing files are errors."""
    name, model = _split_name(argument.strip())
    if model.lower() == "bicubic":
        return ModelSpec(name or "bicubic", "bicubic", "bicubic", (BICUBIC_CONFIG,))
    checkpoint_text, at, config_text = model.rpartition("@")
    if at and config_text.endswith(_CONFIG_SUFFIXES):
        checkpoint = _existing(Path(checkpoint_text).expanduser(), "checkpoint", argument)
        config = _existing(Path(config_text).expanduser(), "config", argument)
        return ModelSpec(name or _checkpoint_name(checkpoint), "checkpoint", argument, (config,), checkpoint)
    path = Path(model).expanduser()
    if model.endswith(_CONFIG_SUFFIXES):
        config = _existing(path, "config", argument)
        return ModelSpec(name or config.stem, "config", argument, (config,))
    checkpoint = _existing(path, "checkpoint", argument)
    config = find_run_config(checkpoint)
    if config is None:
        raise CheckpointError(
            f"model {argument!r}: no config.yaml beside {checkpoint} or in its run folder (effsr fit writes one "
            "there); give the experiment config explicitly as NAME=CKPT@CONFIG.yaml."
        )
    return ModelSpec(name or _checkpoint_name(checkpoint), "checkpoint", argument, (config.resolve(),), checkpoint)


def parse_models(arguments: list[str]) -> list[ModelSpec]:
    """All model arguments; two models with one name are an error (the table and JSON key on names)."""
    if not arguments:
        raise ConfigError("effsr compare needs at least one model (a checkpoint, a config or `bicubic`).")
    specs = [parse_model(argument) for argument in arguments]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"two models are named {spec.name!r} ({seen[spec.name]!r} and {spec.source!r}); name them "
                "explicitly, e.g. a=runs/x/checkpoints/last.ckpt b=runs/y/checkpoints/last.ckpt."
            )
        seen[spec.name] = spec.source
    return specs
