"""SMSR weights: official state_dicts (key layout of the released code) and effsr checkpoints, the converter."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning
from torch import Tensor

from effsr.checkpointing import atomic_torch_save
from effsr.errors import CheckpointError
from effsr.methods.smsr.network import SMSR
from effsr.weights import StateFilter, compose, read_checkpoint, state_dict_of, strip_prefix

#: Official layout filter: the released state_dicts (DataParallel-saved ones under ``module.``) and effsr
#: checkpoints (``network.``) both become the bare SMSR key layout (``head.0.weight``, ``body.k.body.ch_mask``...).
SMSR_STATE_FILTER: StateFilter = compose(strip_prefix("module."), strip_prefix("network."))


def network_init_args(network: SMSR) -> dict[str, Any]:
    """The :class:`SMSR` constructor arguments that determine the state_dict layout and pixel range."""
    return {
        "scale": int(network.scale),
        "num_features": int(network.head[0].out_channels),
        "num_modules": len(network.body),
        "num_layers": int(network.body[0].body.n_layers),
        "pixel_range": float(network.pixel_range),
    }


def smsr_from_state_dict(state: dict[str, Tensor], pixel_range: float, source: str) -> SMSR:
    """An :class:`SMSR` shaped like ``state`` (official key layout after :data:`SMSR_STATE_FILTER`).

    Width, module and layer counts and the scale are read from the tensor shapes; any other layout is refused
    with a message naming ``source``.
    """
    state = SMSR_STATE_FILTER(state)
    if "head.0.weight" not in state or "body.0.body.ch_mask" not in state or "tail.0.weight" not in state:
        raise CheckpointError(
            f"{source} is not an SMSR state_dict (no `head.0.weight` / `body.0.body.ch_mask` / `tail.0.weight`)."
        )
    width = state["head.0.weight"].shape[0]
    n_modules = len({key.split(".")[1] for key in state if key.startswith("body.")})
    n_layers = state["body.0.body.ch_mask"].shape[2]
    scale = int(round(math.sqrt(state["tail.0.weight"].shape[0] / 3)))
    network = SMSR(scale=scale, num_features=width, num_modules=n_modules, num_layers=n_layers,
                   pixel_range=pixel_range)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: key layout differs from SMSR: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}."
            )
    network.load_state_dict({key: value.float() for key, value in state.items()})
    return network


def load_smsr_weights(path: str, pixel_range: float | None = None) -> SMSR:
    """An official SMSR state_dict (pixel range 255) or an effsr SMSR checkpoint as an eval-mode :class:`SMSR`.

    effsr checkpoints carry their pixel range when converted (``smsr_network``); for trained ones it defaults to
    255, the range of every SMSR config in ``experiments/``. ``pixel_range`` overrides both.
    """
    loaded = read_checkpoint(path, "SMSR weights")
    state = state_dict_of(loaded, path, "SMSR weights")
    if pixel_range is None:
        converted = loaded.get("smsr_network", {}) if isinstance(loaded, dict) else {}
        pixel_range = float(converted.get("pixel_range", 255.0))
    return smsr_from_state_dict(state, pixel_range, path).eval()


def convert_official_checkpoint(src: str, dst: str, scale: int) -> None:
    """Converts an official SMSR state_dict (pixel range 255) into an effsr checkpoint, atomically.

    The result has the layout of effsr's own checkpoints (``state_dict`` with the ``network.`` prefix, the
    ``effsr`` phase state, no ``hyper_parameters`` — LightningCLI would merge those into the config) plus
    ``smsr_network``: the SMSR arguments it needs, checked against the config's network when it is loaded.
    """
    state = state_dict_of(read_checkpoint(src, "official SMSR checkpoint"), src, "official SMSR checkpoint")
    network = smsr_from_state_dict(state, 255.0, src)
    if network.scale != scale:
        raise CheckpointError(f"{src} is a ×{network.scale} SMSR checkpoint, but --scale {scale} was given.")
    checkpoint = {
        "state_dict": {f"network.{key}": value.contiguous() for key, value in network.state_dict().items()},
        "effsr": {"phase_name": None, "phase_settings": {}, "schedule_values": {}, "structure": {}},
        "smsr_network": network_init_args(network),
        "converted_from": os.path.basename(src),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    atomic_torch_save(checkpoint, dst)
