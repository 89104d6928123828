"""One loader for network weights from files: effsr checkpoints, plain state dicts and official releases.

Every file is read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`): a checkpoint whose pickle
needs code (a class, a function, a shell command) is refused, whoever passes it (``reference_checkpoint``,
``dense_checkpoint``, N:M members, ``effsr convert``, ``--ckpt_path`` of profile/compare). effsr's own Lightning
checkpoints hold only tensors, numbers, strings and containers, so they load under the same policy.

Official layouts are handled by *filter functions* (``state -> state``), as timm's ``pretrained_filter_fn``:
:func:`strip_prefix` (``network.``, DataParallel's ``module.``, a ClassSR branch prefix), composed with
:func:`compose`, and method-specific key maps (SMSR's converter) of the same type.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effsr.errors import CheckpointError

__all__ = [
    "StateFilter",
    "compose",
    "load_network_state",
    "read_checkpoint",
    "state_dict_of",
    "strip_prefix",
]

StateFilter = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """The object stored in ``path``, loaded without running any code from it (``weights_only=True``).

    ``what`` names the option the path came from, so errors say e.g. "reference_checkpoint '...'".
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{what} '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {what} '{path}': it needs arbitrary unpickling ({str(error).splitlines()[0]}). "
            "effsr only reads tensors and state dicts from files; re-save it as a state_dict "
            "(torch.save(model.state_dict(), ...)) in a trusted environment."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read {what} '{path}': {error}. Is the file complete?") from error


def state_dict_of(checkpoint: Any, path: str | Path = "", what: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor mapping inside a loaded checkpoint: Lightning's ``state_dict``, ``params``/``model`` of other
    toolboxes, or the checkpoint itself when it already is a state dict."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "params_ema", "params", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
            return dict(checkpoint)
    raise CheckpointError(f"{what} '{path}' holds no state dict (found {type(checkpoint).__name__}); "
                          "expected an effsr/Lightning checkpoint or a torch.save(model.state_dict()) file.")


def strip_prefix(*prefixes: str, required: bool = False) -> StateFilter:
    """A filter keeping the keys under the first of ``prefixes`` present in the state, without that prefix.

    A state holding none of them passes unchanged, unless ``required`` (then it is empty and the load reports
    every key as missing)."""

    def apply(state: dict[str, Tensor]) -> dict[str, Tensor]:
        for prefix in prefixes:
            if any(key.startswith(prefix) for key in state):
                return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        return {} if required else state

    return apply


def compose(*filters: StateFilter | None) -> StateFilter:
    """Applies ``filters`` left to right (``None`` entries are skipped)."""

    def apply(state: dict[str, Tensor]) -> dict[str, Tensor]:
        for state_filter in filters:
            if state_filter is not None:
                state = state_filter(state)
        return state

    return apply


def _first(keys: Iterable[str], count: int = 5) -> list[str]:
    return sorted(keys)[:count]


def load_network_state(network: nn.Module, path: str | Path, *, prefix: str | tuple[str, ...] = "network.",
                       filter_fn: StateFilter | None = None, strict: bool = True,
                       ignore_missing: Callable[[str], bool] | None = None, what: str = "checkpoint") -> Any:
    """Loads the weights in ``path`` into ``network`` and returns the whole loaded checkpoint.

    Keys are taken under ``prefix`` (an effsr checkpoint's ``network.``; DataParallel's ``module.`` is always
    stripped) when present, then passed through ``filter_fn``. With ``strict`` every key must match in name and
    shape, except missing keys for which ``ignore_missing(key)`` is true (buffers a method recomputes).
    """
    checkpoint = read_checkpoint(path, what)
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    state = compose(strip_prefix("module."), strip_prefix(*prefixes) if prefixes else None, filter_fn)(
        state_dict_of(checkpoint, path, what))
    expected = network.state_dict()
    missing = [key for key in expected if key not in state and not (ignore_missing and ignore_missing(key))]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                   for key in state if key in expected and state[key].shape != expected[key].shape]
    if wrong_shape or (strict and (missing or unexpected)):
        problems = []
        if missing:
            problems.append(f"missing {_first(missing)}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
        if unexpected:
            problems.append(f"unexpected {_first(unexpected)}"
                            + (f" (+{len(unexpected) - 5})" if len(unexpected) > 5 else ""))
        if wrong_shape:
            problems.append(f"shape mismatch {wrong_shape[:5]}")
        raise CheckpointError(f"{what} '{path}' does not fit {type(network).__name__}: {'; '.join(problems)}. "
                              "Check that the config's network (width, depth, scale) is the one it was trained with.")
    network.load_state_dict(state, strict=False)
    return checkpoint
