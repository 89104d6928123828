"""benchmarks/nm_adaptive.py's members: HR/LR pairs of the image folders, aligned random crops, the dense and
N:M members trained here (cached in the work dir, keyed by their settings) or loaded from ``--members``."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from effsr.archs import EDSR, MSRResNet
from effsr.methods.nm_adaptive import load_nm_member
from effsr.methods.nm_sparsity import NMSparsityModule, nm_layers
from effsr.ops import bicubic_degrade
from effsr.weights import read_checkpoint

SCALE = 4


@dataclass
class Pair:
    """One image: LR and HR as float tensors (1, 3, h, w) in [0, 255] (uint8 values)."""

    name: str
    lr: Tensor
    hr: Tensor


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_pairs(folder: Path) -> list[Pair]:
    """HR images (PNG/JPEG/BMP; grayscale → RGB), mod-cropped; LR by the MATLAB-compatible bicubic, uint8."""
    pairs = []
    for path in sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        hr, lr = bicubic_degrade(np.array(Image.open(path).convert("RGB")), SCALE)
        pairs.append(Pair(path.stem, *(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() for a in (lr, hr))))
    if not pairs:
        raise SystemExit(f"no PNG/JPEG/BMP images in {folder}")
    return pairs


def random_crops(pairs: list[Pair], count: int, patch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` aligned random LR/HR crops (LR ``patch``²) with a random flip / 90° rotation each."""
    lrs, hrs = [], []
    for _ in range(count):
        pair = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        y = int(torch.randint(pair.lr.shape[-2] - patch + 1, (1,), generator=generator))
        x = int(torch.randint(pair.lr.shape[-1] - patch + 1, (1,), generator=generator))
        lr = pair.lr[..., y:y + patch, x:x + patch]
        hr = pair.hr[..., y * SCALE:(y + patch) * SCALE, x * SCALE:(x + patch) * SCALE]
        turns = int(torch.randint(4, (1,), generator=generator))
        lr, hr = lr.rot90(turns, (2, 3)), hr.rot90(turns, (2, 3))
        if bool(torch.randint(2, (1,), generator=generator)):
            lr, hr = lr.flip(3), hr.flip(3)
        lrs.append(lr)
        hrs.append(hr)
    return torch.cat(lrs), torch.cat(hrs)


def signature(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_phase(module: NMSparsityModule, phase: str, steps: int, peak_lr: float, pairs: list[Pair],
              args: argparse.Namespace, generator: torch.Generator) -> int:
    """Trains ``steps`` optimizer steps of one phase (cosine lr decay to 2 % of ``peak_lr``); ``search`` stops
    as soon as the budget is reached. Returns the steps run."""
    module.enter_phase(phase, {"lr": peak_lr})
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    weights = next(group for group in optimizer.param_groups if group.get("name") == "weights")
    module.train()
    for step in range(steps):
        if phase == "search" and module.phase_condition("budget_reached"):
            return step
        weights["lr"] = peak_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        lr, hr = random_crops(pairs, args.batch_size, args.patch, generator)
        module.before_step(step)
        loss, _ = module.training_loss(lr, hr, {})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps


def backbone(args: argparse.Namespace) -> EDSR | MSRResNet:
    """The members' backbone on the [0, 255] pixel range."""
    kind = {"edsr": EDSR, "msrresnet": MSRResNet}[args.arch]
    return kind(SCALE, num_features=args.features, num_blocks=args.blocks, pixel_range=255.0)


def build_members(args: argparse.Namespace, pairs: list[Pair]) -> tuple[list[NMSparsityModule], list[str], str]:
    """Dense member + one N:M member per budget (each from the previous one), cached in the work dir; returns
    the modules, a log line each and the signature of the last member (which covers all)."""
    settings: dict[str, Any] = {key: getattr(args, key) for key in (
        "arch", "features", "blocks", "m", "cost_weight", "score_lr", "dense_steps", "dense_lr", "search_steps",
        "finetune_steps", "finetune_lr", "patch", "batch_size")}
    modules: list[NMSparsityModule] = []
    log: list[str] = []
    for index, budget in enumerate([1.0, *args.budgets]):
        settings["budgets"] = [1.0, *args.budgets][:index + 1]
        path = args.work_dir / f"member{index}_{signature(settings)}.pt"
        module = NMSparsityModule(backbone(args), m=args.m, budget=budget, cost_weight=args.cost_weight,
                                  score_lr=args.score_lr, anneal_interval=5, anneal_threshold=0.02, rerank_interval=20)
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            module.rebuild_structure(saved["structure"])
            module.network.load_state_dict(saved["network"])
            module.phase_name = "finetune"
            log.append(f"budget {budget:g}: loaded {path} ({saved['log']})")
        else:
            started = time.time()
            generator = torch.Generator().manual_seed(index)
            if index == 0:
                steps = run_phase(module, "dense", args.dense_steps, args.dense_lr, pairs, args, generator)
                module.enter_phase("finetune", {})
                message = f"dense {steps} steps"
            else:
                module.network.load_state_dict(modules[-1].network.state_dict())
                searched = run_phase(module, "search", args.search_steps, args.finetune_lr, pairs, args, generator)
                reached = module.cost_fraction()
                tuned = run_phase(module, "finetune", args.finetune_steps, args.finetune_lr, pairs, args, generator)
                message = (f"search {searched} steps (N:M-layer cost {reached:.3f}, c={module.anneal_c:.2f}), "
                           f"finetune {tuned} steps")
            message += f", {time.time() - started:.0f} s"
            args.work_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"network": module.network.state_dict(), "structure": module.structure_state(),
                        "log": message, "settings": settings}, path)
            log.append(f"budget {budget:g}: {message}")
        module.eval()
        modules.append(module)
    return modules, log, signature(settings)


def load_members(args: argparse.Namespace) -> tuple[list[nn.Module], list[float], list[str], str]:
    """The ``--members`` checkpoints (dense or N:M, through the safe loader): networks, their N:M budget (1 for a
    dense one), a log line each and a signature of the files (path, size, mtime) for the caches."""
    networks, budgets, log, files = [], [], [], []
    for path in args.members:
        network, cost = load_nm_member(backbone(args), str(path), args.m, "--members")
        structure = read_checkpoint(path, "--members").get("effsr", {}).get("structure", {})
        budget = float(structure.get("budget") or 1.0) if nm_layers(network) else 1.0
        networks.append(network.eval())
        budgets.append(budget)
        log.append(f"budget {budget:g}: {path} (cost {cost:.3f} of dense)")
        files.append([str(Path(path).resolve()), Path(path).stat().st_size, Path(path).stat().st_mtime])
    return networks, budgets, log, signature({"members": files})
