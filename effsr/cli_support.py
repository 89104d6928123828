"""What the ``effsr`` command does around LightningCLI: packaged experiment configs (listing, bare names),
readable option errors, early checks of the checkpoint files a config names, and the CPU thread count.

Nothing here builds a model or a trainer, so these pieces are cheap to call before LightningCLI runs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from effsr.errors import CheckpointError, ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# The experiment configs shipped in the wheel; in a clone `effsr/experiments` links to the repository's experiments/.
PACKAGED_EXPERIMENTS = PACKAGE_DIR / "experiments"
PACKAGED_CONFIGS = PACKAGE_DIR / "configs"  # the demo's configs
_CONFIG_FLAGS = ("--config", "-c")


# ---------------------------------------------------------------------------- experiment configs
def experiment_dirs() -> list[Path]:
    """Folders whose YAML files ``effsr`` without arguments lists: ./experiments, then the packaged ones."""
    seen: list[Path] = []
    for candidate in (Path.cwd() / "experiments", PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        if candidate.is_dir() and candidate.resolve() not in [path.resolve() for path in seen]:
            seen.append(candidate)
    return seen


def packaged_config_names() -> list[str]:
    """Names (``smsr_x4``, ``tiny/smsr_x2``, ``trainer/ddp``) that ``--config`` accepts without a file."""
    names = []
    for folder in (PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        if folder.is_dir():
            names += [path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.yaml")]
    return sorted(set(names))


def resolve_config(value: str) -> str:
    """``value`` when it is a file; else the packaged config of that name.

    ``smsr_x4``, ``smsr_x4.yaml`` and ``experiments/smsr_x4.yaml`` all name ``effsr/experiments/smsr_x4.yaml``, so
    the paths of the docs work from any folder with an installed effsr. Inline YAML (``--config '{...}'``) is
    passed through for jsonargparse.
    """
    if Path(value).is_file() or any(char in value for char in "{}:\n") or not value.strip():
        return value
    name = value.removeprefix("./").removeprefix("experiments/").removesuffix(".yaml")
    for folder in (PACKAGED_EXPERIMENTS, PACKAGED_CONFIGS):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate)
    close = difflib.get_close_matches(name, packaged_config_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"--config {value}: no such file and no packaged experiment '{name}'.{hint} "
                      "Run `effsr` without arguments to list the experiment configs.")


def resolve_config_args(argv: Iterable[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` / ``-c X`` value passed through :func:`resolve_config`."""
    items = list(argv)
    resolved: list[str] = []
    index = 0
    while index < len(items):
        item = items[index]
        if item in _CONFIG_FLAGS and index + 1 < len(items):
            resolved += [item, resolve_config(items[index + 1])]
            index += 2
            continue
        flag, equals, value = item.partition("=")
        resolved.append(f"{flag}={resolve_config(value)}" if equals and flag in _CONFIG_FLAGS else item)
        index += 1
    return resolved


# ---------------------------------------------------------------------------- option errors
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|unrecognized arguments: --?([^\s=]+)")


def accepted_parameters(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` to the parent classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())
        names += [p.name for p in parameters if p.name != "self" and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _suggest(name: str, valid: list[str], prefix: str = "") -> str:
    """'did you mean X?' with the closest valid names (difflib), or the valid names when none is close."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(prefix + item for item in close)}?"
    return f"valid: {', '.join(prefix + item for item in valid)}" if 0 < len(valid) <= 30 else ""


def option_error_message(message: str, subcommand: str | None, option_names: list[str]) -> str:
    """One readable line for a jsonargparse error: the option's full name and the closest valid names.

    ``option_names``: every option of the (sub)command's parser (for trainer/data typos). Other errors (a bad
    value, a missing file) keep jsonargparse's text, without the usage that used to precede it.
    """
    command = f"effsr {subcommand}" if subcommand else "effsr"
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted:
        path: list[str] = []
        class_path = None
        for line in message.splitlines():
            key, klass = _PARSER_KEY.search(line), _CLASS_PATH.search(line)
            if key:
                path.append(key.group(1))
            if klass:
                class_path = klass.group(1)
                path.append("init_args")
            if _NOT_ACCEPTED.search(line):
                break
        name = not_accepted.group(1)
        cls = _import_class(class_path) if class_path else None
        valid = accepted_parameters(cls) if cls else []
        prefix = ".".join(path)
        full = f"{prefix}.{name}" if prefix else name
        suggestion = _suggest(name, valid, f"{prefix}." if prefix else "")
        owner = class_path or "this command"
        helper = f"`{command} --{'.'.join(path[:-1])}.help {class_path}`" if class_path else f"`{command} --help`"
        suggestion = f"{suggestion} " if suggestion else ""
        return f"option {full} is not accepted by {owner}; {suggestion}(all options: {helper})"
    unknown = _UNKNOWN_OPTION.search(message)
    if unknown:
        full = unknown.group(1) or unknown.group(2)
        suggestion = _suggest(full, option_names)
        return f"option {full} is not accepted by `{command}`; {suggestion or f'see `{command} --help`'}"
    return message.strip()


# ---------------------------------------------------------------------------- checkpoint files a config names
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

    Covers ``checkpoints`` (members of an ensemble, ``null`` = none) and ``dense_checkpoint``; the message names
    the option, the file and the command that writes it.
    """
    def get(key: str) -> Any:
        return init_args.get(key) if hasattr(init_args, "get") else getattr(init_args, key, None)

    named = [(f"model.init_args.checkpoints[{i}]", path) for i, path in enumerate(get("checkpoints") or [])]
    named.append(("model.init_args.dense_checkpoint", get("dense_checkpoint")))
    source = f" (the header of {config_files[-1]} says how each is trained)" if config_files else ""
    for option, path in named:
        if not path or not isinstance(path, str) or Path(path).is_file():
            continue
        command = member_training_command(path)
        make = f"train it with: {command}" if command else f"train it first or fix the path{source}"
        raise CheckpointError(f"{option}: checkpoint {path} does not exist; {make}")


# ---------------------------------------------------------------------------- CPU threads
def apply_thread_count(threads: int | None, announce: bool = True) -> tuple[int, str]:
    """Sets torch's intra-op CPU threads: ``threads`` when given, else OMP_NUM_THREADS when set, else torch's
    default. Returns (count, why) and prints one line saying so (rank 0 only)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        value = os.environ["OMP_NUM_THREADS"].strip()
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={value!r} is not a positive integer; unset it or use --threads N")
        torch.set_num_threads(int(value))
        why = "OMP_NUM_THREADS"
    else:
        why = f"torch's default for {os.cpu_count()} CPUs; set --threads N or OMP_NUM_THREADS to change it"
    count = torch.get_num_threads()
    if announce and rank_zero_only.rank == 0:
        print(f"[effsr] {count} CPU thread{'s' if count != 1 else ''} ({why})", flush=True)
    return count, why
