"""ClassSR's files: the reference (-O) and ``split_model`` loaded through :mod:`effsr.weights`, and branches
saved alone as plain backbone checkpoints with their config."""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from effsr.errors import CheckpointError, ConfigError
from effsr.methods.classsr.network import ClassSRNet
from effsr.weights import StateFilter, load_network_state, strip_prefix


def wide_branch_filter(network: ClassSRNet) -> StateFilter:
    """Filter of ClassSR checkpoints: keeps the wide branch's keys (``branches.<K-1>.``) when present, so a
    ClassSR, backbone (``network.*``) or plain state dict all load into the wide branch."""
    return strip_prefix(f"branches.{network.num_classes - 1}.")


def load_reference_weights(network: ClassSRNet, path: str) -> None:
    """Loads the wide branch from a backbone checkpoint (``network.*``), a ClassSR checkpoint or a state dict,
    through :func:`effsr.weights.load_network_state` (``weights_only``: a pickle that needs code is refused)."""
    load_network_state(network.branches[-1], path, prefix="network.", filter_fn=wide_branch_filter(network),
                       what="reference_checkpoint")


def load_branch_weights(network: ClassSRNet, path: str) -> dict[str, Any]:
    """Loads every branch from a ClassSR checkpoint (``network.branches.*``; strict: same widths and backbone) and
    returns that checkpoint's effsr structure state (its split), {} when it has none."""
    checkpoint = load_network_state(network.branches, path, prefix="network.",
                                    filter_fn=strip_prefix("branches.", required=True), what="branches_checkpoint")
    structure = checkpoint.get("effsr", {}).get("structure") if isinstance(checkpoint, dict) else None
    return dict(structure or {})


def _instantiate(spec: Any) -> Any:
    """``{class_path, init_args}`` dicts (nested ones too) as objects; other values unchanged."""
    if isinstance(spec, dict) and "class_path" in spec:
        path = spec["class_path"]
        module_name, _, class_name = path.rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"class_path '{path}' not found") from error
        return target(**{key: _instantiate(value) for key, value in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {key: _instantiate(value) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_instantiate(value) for value in spec]
    return spec


def load_split_model(argument: str, scale: int) -> nn.Module:
    """The network ``split_model`` names: an effsr checkpoint (its run's ``config.yaml`` found as ``effsr
    compare`` finds it) or ``CKPT@CONFIG.yaml``; a ClassSR model scores with its wide branch. Weights go
    through :func:`effsr.weights.load_network_state`; the scale must be ``scale``."""
    from effsr.cli_support import composed_yaml
    from effsr.compare.models import parse_model

    try:
        spec = parse_model(argument)
    except (CheckpointError, ConfigError) as error:
        raise ConfigError(f"model.init_args.split_model: {error}") from error
    if spec.checkpoint is None or not spec.configs:
        raise ConfigError(f"model.init_args.split_model '{argument}' must be a checkpoint (or CKPT@CONFIG.yaml)")
    config = composed_yaml(spec.configs[-1])  # a per-scale config with its recipe (`base:`) merged in
    trained_scale = (config.get("data") or {}).get("scale")
    if trained_scale is not None and int(trained_scale) != int(scale):
        raise ConfigError(f"split_model '{argument}' is a x{trained_scale} model ({spec.configs[-1]}), "
                          f"this run is x{scale}; give a model of the same scale")
    network_spec = copy.deepcopy(((config.get("model") or {}).get("init_args") or {}).get("network"))
    if not isinstance(network_spec, dict) or "class_path" not in network_spec:
        raise ConfigError(f"split_model '{argument}': {spec.configs[-1]} has no model.init_args.network")
    network_spec.setdefault("init_args", {}).setdefault("scale", int(scale))
    network = _instantiate(network_spec)
    load_network_state(network, spec.checkpoint, prefix="network.", what="split_model")
    scorer = network.branches[-1] if isinstance(network, ClassSRNet) else network
    if int(getattr(scorer, "scale", scale)) != int(scale):
        raise ConfigError(f"split_model '{argument}' upsamples by x{scorer.scale}, this run is x{scale}")
    return scorer.eval().requires_grad_(False)


def run_config_path(trainer: Any) -> Path | None:
    """The ``config.yaml`` that ``effsr fit`` wrote for ``trainer``'s run, if any (reads ``trainer.log_dir``: a
    collective under DDP, so every rank calls it)."""
    for folder in (trainer.log_dir or "", trainer.default_root_dir):
        if folder and (Path(folder) / "config.yaml").is_file():
            return Path(folder) / "config.yaml"
    return None


def backbone_config(spec: dict[str, Any], run_config: dict[str, Any] | None, scale: int) -> dict[str, Any]:
    """The config of a branch saved alone: the run's config (data, trainer without callbacks) with the model
    replaced by a plain :class:`effsr.models.SRModule` of the branch's backbone."""
    config = copy.deepcopy(run_config or {})
    config.pop("ckpt_path", None)
    trainer = dict(config.get("trainer") or {})
    trainer.pop("callbacks", None)
    trainer["logger"] = False
    config["trainer"] = trainer
    config["model"] = {"class_path": "effsr.models.SRModule", "init_args": {"network": copy.deepcopy(spec)}}
    data = dict(config.get("data") or {})
    data["scale"] = int(scale)
    config["data"] = data
    return config


def export_backbone(branch: nn.Module, folder: Path, name: str, spec: dict[str, Any] | None,
                    run_config: dict[str, Any] | None, scale: int, info: dict[str, Any]) -> Path:
    """Writes ``folder/<name>.ckpt`` (atomically): ``branch`` as the ``network`` of a plain SRModule checkpoint,
    which ``effsr test``/``effsr compare`` evaluate and ``reference_checkpoint``/``split_model`` load; and
    ``folder/config.yaml`` (:func:`backbone_config`) when the branch's backbone spec is known."""
    import lightning
    import yaml

    from effsr.checkpointing import atomic_torch_save

    folder.mkdir(parents=True, exist_ok=True)
    state = {f"network.{key}": value.detach().cpu().clone() for key, value in branch.state_dict().items()}
    checkpoint = {"state_dict": state, "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": int(info.get("global_step", 0)), "classsr_export": dict(info)}
    path = folder / f"{name}.ckpt"
    atomic_torch_save(checkpoint, path)
    if spec:
        handle, temporary = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=folder)
        with os.fdopen(handle, "w") as stream:
            yaml.safe_dump(backbone_config(spec, run_config, scale), stream, sort_keys=False)
        os.replace(temporary, folder / "config.yaml")
    return path
