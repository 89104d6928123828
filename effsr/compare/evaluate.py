"""Evaluating one model of a comparison with effsr's own test loop, and timing its inference path.

Metrics and cost come from ``Trainer.test`` of the model's SRModule, exactly as ``effsr test`` computes them
(paper-protocol Y-PSNR/SSIM, RGB PSNR, per-set ``macs_720p``/``params`` as the module's cost report gives them,
sparse and routed execution counted as run); the per-set numbers are read back from the
``test_results.json`` it writes. Latency is the median wall time of ``SRModule.super_resolve`` (the path
validation, test and predict use) on one random LR image whose ×scale output is 1280×720.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

from effsr.compare.models import ModelSpec
from effsr.cost import lr_size_for_720p
from effsr.errors import CheckpointError, ConfigError
from effsr.profile import time_runs_ms

__all__ = ["evaluate_model", "measure_latency_ms", "safe_name"]


def safe_name(name: str) -> str:
    """A model name as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _scale_error(spec: ModelSpec, trained: int, scale: int) -> CheckpointError:
    return CheckpointError(
        f"model {spec.name!r}: checkpoint {spec.checkpoint} is a ×{trained} model (its config {spec.configs[-1]}: "
        f"data.scale={trained}) but --scale is {scale}; compare models of one scale, or pass --scale {trained}."
    )


def checkpoint_scale(spec: ModelSpec) -> int:
    """The scale a checkpoint was trained at: ``data.scale`` of its configs (the last file setting it wins)."""
    scale = None
    for config in spec.configs:
        content = yaml.safe_load(config.read_text()) or {}
        value = (content.get("data") or {}).get("scale") if isinstance(content, dict) else None
        scale = int(value) if value is not None else scale
    if scale is None:
        raise ConfigError(f"model {spec.name!r}: no data.scale in {', '.join(map(str, spec.configs))}; "
                          "give the run's config (config.yaml of its run folder) as NAME=CKPT@CONFIG.yaml.")
    return scale


def evaluate_model(spec: ModelSpec, scale: int, test_sets: list[str], work_dir: Path,
                   accelerator: str | None = None, threads: int | None = None) -> tuple[dict[str, Any], Any]:
    """Runs ``Trainer.test`` of ``spec`` on ``test_sets``; returns (test_results.json content, the module).

    Checkpoints keep the scale of their config (a different ``scale`` is an error); configs and bicubic are
    built at ``scale``. Results go to ``work_dir/<name>/test_results.json``. ``threads`` (the count the compare
    command already set and announced) is passed on as ``--threads``, silently.
    """
    from effsr.cli import EffSRCLI

    if spec.kind == "checkpoint" and (trained := checkpoint_scale(spec)) != scale:
        raise _scale_error(spec, trained, scale)
    results_dir = work_dir / safe_name(spec.name)
    args = ["test", *spec.config_args(), "--trainer.logger=false", "--trainer.devices=1", "--trainer.num_nodes=1",
            "--trainer.strategy=auto", f"--trainer.default_root_dir={results_dir}",
            f"--model.init_args.results_dir={results_dir}", f"--data.test_sets={json.dumps(test_sets)}",
            f"--data.scale={scale}"]
    if spec.checkpoint:
        args.append(f"--ckpt_path={spec.checkpoint}")
    if accelerator:
        args.append(f"--trainer.accelerator={accelerator}")
    if threads is not None:
        args.append(f"--threads={threads}")
    try:
        # exactly `effsr test` (checkpoint structure and weights loaded by Lightning)
        cli = EffSRCLI(args=args, announce_threads=False)
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        raise CheckpointError(
            f"model {spec.name!r}: checkpoint {spec.checkpoint} does not fit the network of {spec.configs[-1]} "
            f"({str(error).splitlines()[0]}); give the run's own config as NAME=CKPT@CONFIG.yaml."
        ) from error
    results = json.loads((results_dir / "test_results.json").read_text())
    return results, cli.model


def measure_latency_ms(module: Any, scale: int, repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """Median wall time [ms] of ``module.super_resolve`` on a random LR image of the 1280×720-output size.

    Batch 1, ``torch.inference_mode``, ``warmup`` untimed runs first; on CUDA every run is synchronised.
    The module is left on ``device`` in eval mode.
    """
    if repeats < 1:
        raise ConfigError(f"--latency_repeats must be >= 1, got {repeats}")
    target = torch.device(device)
    module = module.to(target).eval()
    generator = torch.Generator().manual_seed(0)
    lr = torch.rand((1, 3, *lr_size_for_720p(scale)), generator=generator).to(target)
    with torch.inference_mode():
        return statistics.median(time_runs_ms(lambda: module.super_resolve(lr), repeats, warmup, target))
