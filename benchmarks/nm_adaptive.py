"""Adaptive N:M patch inference: PSNR-vs-MACs of routing over an ensemble against each single network.

1. Members: ``--members CKPT ...`` (dense and N:M checkpoints of one backbone, e.g. the dense start and the SLS
   arms of ``benchmarks/reproduce.py nm_x4``, each searched from that dense start), or trained here: one backbone
   dense, then N:M members at decreasing budgets, each from the previous one (dense → search until its budget →
   finetune, :class:`effsr.methods.nm_sparsity.NMSparsityModule`) on ``--train_sets`` (default Set14).
   LR = MATLAB bicubic (``effsr.ops.bicubic_degrade``).
2. Estimators: a pool of random LR tiles (routing size) from ``--train_sets`` with every member's actual per-tile
   Y-MSE; one estimator per member trained on it (relative parameterisation, :class:`NMEnsemble`).
3. Held-out evaluation on ``--eval_sets`` (default Set5): the routing tiles of every image; Spearman rank
   correlation of estimated vs actual MSE and of estimated vs actual MSE gap to the reference member.
4. Curves per held-out set: every single network and the adaptive policy argmin_k est_MSE_k + λ·cost_k (λ swept;
   MSE of Y in [0, 1] units per tile, cost = fraction of the dense MACs), stitched by ``routed_forward``; Y-PSNR
   (effsr metrics, crop 4) against MACs per 1280×720 output (the chosen members' per-tile MACs and all estimators,
   counted by ``count_macs`` on a routing tile). Every member runs once on every tile; a routing replays those
   outputs (:class:`Replay`), which stitches exactly what running the chosen members gives. An oracle routing with
   the actual per-tile MSE (same λ, estimators not counted) is the upper bound.

Trained members, the tile pool and the estimators are cached in ``--work-dir`` (keyed by their settings), so a
rerun only evaluates.

    python benchmarks/nm_adaptive.py --images ../shared/data/benchmarks --work-dir runs/nm_adaptive_bench \\
        --output docs/nm_adaptive_curve.png [--wandb]
    python benchmarks/nm_adaptive.py --members DENSE.ckpt SLS25.ckpt SLS125.ckpt --features 32 --m 32 \\
        --train_sets /data/BSD68 --eval_sets /data/SunHays20 /data/Set14 --json curve.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from effsr.archs import EDSR, MSRResNet
from effsr.cost import count_macs, lr_size_for_720p, macs_at_720p
from effsr.inference.tiling import routed_forward, tile_grid
from effsr.methods.nm_adaptive import NMEnsemble, load_nm_member, patch_mse, rank_correlation
from effsr.methods.nm_adaptive.ensemble import member_cost, member_structure
from effsr.methods.nm_sparsity import NMSparsityModule, nm_layers
from effsr.metrics import psnr
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


# ---------------------------------------------------------------------------------------------- members
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


# ---------------------------------------------------------------------------------------------- estimators
def tile_pool(ensemble: NMEnsemble, pairs: list[Pair], count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` random routing-size LR tiles and the (count, K) actual MSE of every member on them."""
    lr, hr = random_crops(pairs, count, ensemble.patch_size, torch.Generator().manual_seed(seed))
    mse = torch.cat([ensemble.member_mse(lr[i:i + 64], hr[i:i + 64]) for i in range(0, count, 64)])
    return lr, mse


def train_estimators(ensemble: NMEnsemble, lr: Tensor, mse: Tensor, epochs: int, batch_size: int) -> float:
    """Adam (2e-3, cosine) on the pool; returns the final epoch's mean loss (squared error of log targets)."""
    ensemble.initialise_estimators(ensemble.targets(mse))
    optimizer = torch.optim.Adam(ensemble.estimators.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(0)
    ensemble.estimators.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        order, losses = torch.randperm(lr.shape[0], generator=generator), []
        for start in range(0, lr.shape[0], batch_size):
            chosen = order[start:start + batch_size]
            loss = ensemble.estimator_loss(lr[chosen], mse[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        scheduler.step()
        epoch_loss = float(np.mean(losses))
    ensemble.estimators.eval()
    return epoch_loss


# ---------------------------------------------------------------------------------------------- evaluation
class SequencePolicy:
    """Returns precomputed choices in the order routed_forward asks for them."""

    def __init__(self, choices: Tensor) -> None:
        self.choices, self.cursor = choices, 0

    def __call__(self, patches: Tensor) -> Tensor:
        chosen = self.choices[self.cursor:self.cursor + patches.shape[0]]
        self.cursor += patches.shape[0]
        return chosen


class Recorder:
    """A member as routed_forward calls it, keeping the tiles it got and what it returned (in call order)."""

    def __init__(self, network: nn.Module) -> None:
        self.network, self.tiles, self.outputs = network, [], []

    def __call__(self, patches: Tensor) -> Tensor:
        output = self.network(patches)
        self.tiles.append(patches)
        self.outputs.append(output)
        return output


class Replay:
    """Member ``index`` replayed from its recorded outputs of every tile: returns those of the tiles ``choices``
    routes to it, in the order routed_forward asks for them (ascending tile index, in batches)."""

    def __init__(self, outputs: Tensor, choices: Tensor, index: int) -> None:
        self.outputs, self.order, self.cursor = outputs, torch.nonzero(choices == index).flatten(), 0

    def __call__(self, patches: Tensor) -> Tensor:
        chosen = self.order[self.cursor:self.cursor + patches.shape[0]]
        self.cursor += patches.shape[0]
        return self.outputs[chosen]


@dataclass
class TiledImage:
    """One held-out image cut into the ensemble's routing tiles, with every member's output on every tile."""

    pair: Pair
    tiles: Tensor
    outputs: list[Tensor]
    actual: Tensor
    estimated: Tensor


@torch.no_grad()
def tile_image(ensemble: NMEnsemble, pair: Pair) -> TiledImage:
    """Runs every member once on every routing tile of ``pair`` (as routed_forward cuts them) and records the
    tiles, the outputs, the actual (P, K) Y-MSE against the HR tiles and the estimated (P, K) MSE."""
    patch = ensemble.patch_size
    if min(pair.lr.shape[-2:]) < patch:
        raise SystemExit(f"{pair.name}: LR {tuple(pair.lr.shape[-2:])} is smaller than the routing tile {patch}")
    outputs, tiles = [], torch.empty(0)
    for member in ensemble.members:
        recorder = Recorder(member)
        routed_forward(pair.lr, [recorder], SCALE, constant_policy(0), patch_size=patch, overlap=ensemble.overlap)
        outputs.append(torch.cat(recorder.outputs))
        tiles = torch.cat(recorder.tiles)
    corners = tile_grid(pair.lr.shape[-2], pair.lr.shape[-1], patch, patch - ensemble.overlap)
    hr = torch.cat([pair.hr[..., y * SCALE:(y + patch) * SCALE, x * SCALE:(x + patch) * SCALE] for y, x in corners])
    actual = torch.stack([patch_mse(output, hr, ensemble.pixel_range, ensemble.y_channel) for output in outputs], 1)
    return TiledImage(pair, tiles, outputs, actual, ensemble.estimate(tiles))


def routed_point(ensemble: NMEnsemble, image: TiledImage, choices: Tensor, tile_macs: list[int],
                 extra_tile_macs: int) -> tuple[float, float, Tensor]:
    """(Y-PSNR, MACs per 1280×720 output, tiles per member) of ``image`` routed by ``choices`` (one member per
    tile): routed_forward stitches the replayed outputs; MACs = Σ chosen member's tile MACs + ``extra`` per tile."""
    replays = [Replay(outputs, choices, k) for k, outputs in enumerate(image.outputs)]
    routed = routed_forward(image.pair.lr, replays, SCALE, SequencePolicy(choices), patch_size=ensemble.patch_size,
                            overlap=ensemble.overlap)
    value = float(psnr(routed.sr / 255, image.pair.hr / 255, crop_border=SCALE, y_channel=True)[0])
    counts = routed.patches_per_network
    macs = sum(int(count) * macs_k for count, macs_k in zip(counts, tile_macs, strict=True))
    macs += extra_tile_macs * int(counts.sum())
    return value, macs / image.pair.hr[0, 0].numel() * 1280 * 720, counts


def curve_point(ensemble: NMEnsemble, images: list[TiledImage], choices: list[Tensor], tile_macs: list[int],
                extra_tile_macs: int) -> dict[str, Any]:
    """Mean Y-PSNR and mean MACs per 1280×720 output over the images, and the share of tiles per member."""
    rows = [routed_point(ensemble, image, choice, tile_macs, extra_tile_macs)
            for image, choice in zip(images, choices, strict=True)]
    counts = torch.stack([row[2] for row in rows]).sum(dim=0).double()
    return {"psnr_y": float(np.mean([row[0] for row in rows])),
            "gmacs_720p": float(np.mean([row[1] for row in rows])) / 1e9, "shares": (counts / counts.sum()).tolist()}


def estimator_quality(estimated: Tensor, actual: Tensor, reference: int,
                      budgets: list[float]) -> list[dict[str, float]]:
    """Per member: mean actual MSE, mean estimated / mean actual (units check), Spearman ρ of estimated vs
    actual MSE and of the estimated vs actual MSE gap to the reference member; printed as a table."""
    rows = []
    print(f"{'member':<16}{'mean MSE':>11}{'est/actual':>12}{'ρ(MSE)':>9}{'ρ(gap to ref)':>15}")
    for k, budget in enumerate(budgets):
        gap = float("nan") if k == reference else rank_correlation(
            estimated[:, k] - estimated[:, reference], actual[:, k] - actual[:, reference])
        row = {"budget": budget, "mean_mse": float(actual[:, k].mean()),
               "mean_est_over_actual": float(estimated[:, k].mean() / actual[:, k].mean()),
               "rho_mse": rank_correlation(estimated[:, k], actual[:, k]), "rho_gap": gap}
        rows.append(row)
        print(f"{'budget ' + format(budget, 'g'):<16}{row['mean_mse']:>11.3e}{row['mean_est_over_actual']:>12.3f}"
              f"{row['rho_mse']:>9.3f}{gap:>15.3f}")
    return rows


def line_at(singles: list[dict[str, Any]], gmacs: float) -> float:
    points = sorted((row["gmacs_720p"], row["psnr_y"]) for row in singles)
    return float(np.interp(gmacs, [p[0] for p in points], [p[1] for p in points]))


def constant_policy(index: int) -> Callable[[Tensor], Tensor]:
    return lambda patches: torch.full((patches.shape[0],), index, dtype=torch.long)


def set_curves(ensemble: NMEnsemble, images: list[TiledImage], penalties: list[float], tile_macs: list[int],
               estimator_tile_macs: int) -> dict[str, Any]:
    """Single members, the adaptive λ sweep (with its agreement with the oracle's choice and its distance to the
    line through the single networks) and the oracle sweep, on one held-out set."""
    singles = [curve_point(ensemble, images, [torch.full((len(image.tiles),), k) for image in images], tile_macs, 0)
               for k in range(len(ensemble.members))]
    costs = ensemble.costs.double()
    adaptive, oracle = [], []
    for penalty in penalties:
        estimated = [(image.estimated.double() + penalty * costs).argmin(dim=1) for image in images]
        best = [(image.actual.double() + penalty * costs).argmin(dim=1) for image in images]
        agreement = float(torch.cat([a == b for a, b in zip(estimated, best, strict=True)]).double().mean())
        point = curve_point(ensemble, images, estimated, tile_macs, estimator_tile_macs)
        adaptive.append({"penalty": penalty, **point, "agreement_with_oracle": agreement,
                         "vs_line_db": point["psnr_y"] - line_at(singles, point["gmacs_720p"])})
        point = curve_point(ensemble, images, best, tile_macs, 0)
        oracle.append({"penalty": penalty, **point,
                       "vs_line_db": point["psnr_y"] - line_at(singles, point["gmacs_720p"])})
    return {"singles": singles, "adaptive": adaptive, "oracle": oracle}


def print_curves(name: str, curves: dict[str, Any], budgets: list[float], costs: list[float]) -> None:
    singles, adaptive, oracle = curves["singles"], curves["adaptive"], curves["oracle"]
    print(f"\n{name}\n{'network':<22}{'cost':>7}{'GMACs@720p':>12}{'PSNR-Y':>9}{'vs line':>9}  shares / oracle")
    for budget, cost, row in zip(budgets, costs, singles, strict=True):
        print(f"{'single budget ' + format(budget, 'g'):<22}{cost:>7.3f}{row['gmacs_720p']:>12.3f}"
              f"{row['psnr_y']:>9.3f}")
    for row, best in zip(adaptive, oracle, strict=True):
        shares = " ".join(f"{share:.2f}" for share in row["shares"])
        print(f"{'adaptive λ=' + format(row['penalty'], 'g'):<22}{'':>7}{row['gmacs_720p']:>12.3f}{row['psnr_y']:>9.3f}"
              f"{row['vs_line_db']:>+9.3f}  {shares}  agree {row['agreement_with_oracle']:.2f} | oracle "
              f"{best['gmacs_720p']:.3f} G {best['psnr_y']:.3f} dB ({best['vs_line_db']:+.3f})")
    low, high = min(s["gmacs_720p"] for s in singles), max(s["gmacs_720p"] for s in singles)
    inside = [row for row in adaptive if low <= row["gmacs_720p"] <= high]
    above = sum(row["vs_line_db"] >= -0.005 for row in inside)
    print(f"adaptive points on/above the line through the single networks: {above}/{len(inside)} inside its MACs "
          f"range; mean {np.mean([r['vs_line_db'] for r in inside]) if inside else float('nan'):+.3f} dB, "
          f"best {max((r['vs_line_db'] for r in inside), default=float('nan')):+.3f} dB")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/benchmarks"),
                        help="folder with Set14/ and Set5/ (the defaults of --train_sets / --eval_sets)")
    parser.add_argument("--train_sets", type=Path, nargs="+", default=None,
                        help="HR folders the members (when trained here) and the estimators train on")
    parser.add_argument("--eval_sets", type=Path, nargs="+", default=None, help="held-out HR folders (curves)")
    parser.add_argument("--members", type=Path, nargs="+", default=None,
                        help="member checkpoints (dense / N:M of one backbone) instead of training them here")
    parser.add_argument("--work-dir", dest="work_dir", type=Path, default=Path("runs/nm_adaptive_bench"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125],
                        help="N:M-layer MACs budgets of the sparse members (the dense member is added)")
    parser.add_argument("--arch", choices=["edsr", "msrresnet"], default="msrresnet",
                        help="backbone (MSRResNet: global bilinear skip, learns fast in short CPU runs)")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--cost_weight", type=float, default=20.0, help="λ of the search (L1 is on [0, 255])")
    parser.add_argument("--score_lr", type=float, default=0.05)
    parser.add_argument("--dense_steps", type=int, default=1500)
    parser.add_argument("--dense_lr", type=float, default=2e-3)
    parser.add_argument("--search_steps", type=int, default=100)
    parser.add_argument("--finetune_steps", type=int, default=150)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument("--patch", type=int, default=16, help="LR training patch of the members")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--route_patch", type=int, default=32, help="LR routing tile (estimators train on it)")
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--estimator_features", type=int, default=16)
    parser.add_argument("--pool", type=int, default=2048, help="training tiles of the estimators")
    parser.add_argument("--estimator_epochs", type=int, default=40)
    parser.add_argument("--absolute", action="store_true", help="estimators predict their own log MSE")
    parser.add_argument("--penalties", type=float, nargs="+",
                        default=[0.0, 1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4, 1.3e-3, 2.6e-3, 1e-2])
    parser.add_argument("--output", type=Path, default=Path("docs/nm_adaptive_curve.png"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--wandb", action="store_true", help="log the curve as a W&B plot")
    parser.add_argument("--wandb_project", default="effsr-bench")
    parser.add_argument("--wandb_mode", default="offline")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU 2 threads were ~7× slower per step)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.time()
    train_sets = args.train_sets or [args.images / "Set14"]
    eval_sets = args.eval_sets or [args.images / "Set5"]
    train_pairs = [pair for folder in train_sets for pair in load_pairs(folder)]

    if args.members:
        networks, budgets, log, members_key = load_members(args)
        costs = [member_cost(network) for network in networks]
        patterns = [member_structure(network) for network in networks]
    else:
        modules, log, members_key = build_members(args, train_pairs)
        networks, budgets = [module.network for module in modules], [1.0, *args.budgets]
        dense_macs = macs_at_720p(copy.deepcopy(modules[0].network).to("meta"), device="meta")
        costs = [module.cost_report()["macs_720p"] / dense_macs for module in modules]
        patterns = [module.pattern() for module in modules]
    print("\n".join(log))
    print(f"members ready: {time.time() - started:.0f} s")
    ensemble = NMEnsemble(networks, costs, args.estimator_features, patch_size=args.route_patch,
                          overlap=args.overlap, relative=not args.absolute)
    ensemble.eval()

    pool_key = signature({"members": members_key, "pool": args.pool, "patch": args.route_patch,
                          "train": [str(folder) for folder in train_sets]})
    estimator_key = signature({"pool": pool_key, "epochs": args.estimator_epochs, "estimator": "v2",
                               "features": args.estimator_features, "relative": not args.absolute})
    estimator_path = args.work_dir / f"estimators_{estimator_key}.pt"
    if estimator_path.is_file():
        saved = torch.load(estimator_path, map_location="cpu", weights_only=False)
        ensemble.estimators.load_state_dict(saved["estimators"])
        estimator_log = f"loaded {estimator_path} ({saved['log']})"
    else:
        pool_started, pool_path = time.time(), args.work_dir / f"tile_pool_{pool_key}.pt"
        if pool_path.is_file():
            pool_lr, pool_mse = torch.load(pool_path, weights_only=True)
        else:
            pool_lr, pool_mse = tile_pool(ensemble, train_pairs, args.pool, seed=7)
            args.work_dir.mkdir(parents=True, exist_ok=True)
            torch.save((pool_lr.to(torch.uint8), pool_mse), pool_path)
        pool_lr = pool_lr.float()
        pool_time = time.time() - pool_started
        final = train_estimators(ensemble, pool_lr, pool_mse, args.estimator_epochs, 64)
        estimator_log = (f"{args.pool} training tiles (member MSEs {pool_time:.0f} s), {args.estimator_epochs} "
                         f"epochs, final loss {final:.4f}, {time.time() - pool_started:.0f} s")
        torch.save({"estimators": ensemble.estimators.state_dict(), "log": estimator_log}, estimator_path)
    print(f"estimators: {estimator_log}")
    probe = torch.zeros(1, 3, args.route_patch, args.route_patch)
    with torch.no_grad():
        tile_macs = [count_macs(member, probe) for member in ensemble.members]
        estimator_tile_macs = sum(count_macs(estimator, probe) for estimator in ensemble.estimators)
    lr_720p = torch.zeros(1, 3, *lr_size_for_720p(SCALE), device="meta")
    estimator_macs = sum(count_macs(copy.deepcopy(e).to("meta"), lr_720p) for e in ensemble.estimators)

    evaluation_started = time.time()
    curves: dict[str, Any] = {}
    correlations: dict[str, list[dict[str, float]]] = {}
    for folder in eval_sets:
        images = [tile_image(ensemble, pair) for pair in load_pairs(folder)]
        estimated = torch.cat([image.estimated for image in images]).double()
        actual = torch.cat([image.actual for image in images]).double()
        print(f"\nestimators on held-out {folder.name} routing tiles ({len(actual)}), LR {args.route_patch}²:")
        correlations[folder.name] = estimator_quality(estimated, actual, ensemble.reference, budgets)
        curves[folder.name] = set_curves(ensemble, images, args.penalties, tile_macs, estimator_tile_macs)
        print_curves(folder.name, curves[folder.name], budgets, costs)
    print(f"\nestimators: {estimator_macs / 1e9:.3f} GMACs per 1280×720 output (all {len(networks)}, counted in the "
          f"adaptive MACs); evaluation {time.time() - evaluation_started:.0f} s")
    print(f"per-layer N (M={args.m}):")
    for budget, pattern in zip(budgets, patterns, strict=True):
        print(f"  budget {budget:<6g} {list(pattern.values()) if pattern else 'dense'}")
    print(f"total time {time.time() - started:.0f} s")
    plot(curves, budgets, args.output)
    result = {"curves": curves, "budgets": budgets, "costs": costs, "correlations": correlations,
              "patterns": patterns, "estimator_gmacs_720p": estimator_macs / 1e9, "log": log,
              "estimators": estimator_log,
              "command": shlex.join(["python", "benchmarks/nm_adaptive.py", *sys.argv[1:]]),
              "seconds": time.time() - started}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.wandb:
        log_wandb(result, args)


def plot(curves: dict[str, dict[str, Any]], budgets: list[float], output: Path) -> None:
    """One panel per held-out set: the single networks (dashed line), adaptive and oracle routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(6.0 * len(curves), 4.2), squeeze=False)
    for axis, (name, curve) in zip(axes[0], curves.items(), strict=True):
        points = sorted(zip([row["gmacs_720p"] for row in curve["singles"]],
                            [row["psnr_y"] for row in curve["singles"]], budgets, strict=True))
        axis.plot([p[0] for p in points], [p[1] for p in points], "o--", color="grey", label="single N:M networks")
        for x, y, budget in points:
            axis.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for key, style, colour, label in (("adaptive", "s-", "C1", "adaptive routing (estimators, λ sweep)"),
                                          ("oracle", "^:", "C2", "oracle routing (actual MSE; upper bound)")):
            ordered = sorted(curve[key], key=lambda row: row["gmacs_720p"])
            axis.plot([row["gmacs_720p"] for row in ordered], [row["psnr_y"] for row in ordered], style,
                      color=colour, label=label, markersize=4)
        axis.set_xlabel("GMACs per 1280×720 output (estimators included)")
        axis.set_ylabel(f"Y-PSNR on {name} ×4 (dB)")
        axis.set_title(f"{name}: adaptive patch routing vs single networks", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    print(f"saved {output}")


def log_wandb(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The curves as W&B line plots per held-out set (+ points, correlations and the PNG); offline by default."""
    import wandb

    run = wandb.init(project=args.wandb_project, mode=args.wandb_mode, name="nm_adaptive",
                     config={key: str(value) for key, value in vars(args).items()}, dir=str(args.work_dir))
    logged: dict[str, Any] = {"nm_adaptive/png": wandb.Image(str(args.output))}
    for name, curve in result["curves"].items():
        ordered = {key: sorted(curve[key], key=lambda row: row["gmacs_720p"])
                   for key in ("singles", "adaptive", "oracle")}
        logged[f"nm_adaptive/{name}/curve"] = wandb.plot.line_series(
            xs=[[row["gmacs_720p"] for row in rows] for rows in ordered.values()],
            ys=[[row["psnr_y"] for row in rows] for rows in ordered.values()], keys=list(ordered),
            title=f"N:M adaptive routing on {name}: Y-PSNR vs GMACs@720p", xname="GMACs per 1280×720 output")
        logged[f"nm_adaptive/{name}/points"] = wandb.Table(
            columns=["curve", "gmacs_720p", "psnr_y", "penalty"],
            data=[[key, row["gmacs_720p"], row["psnr_y"], row.get("penalty")]
                  for key, rows in ordered.items() for row in rows])
    logged["nm_adaptive/correlations"] = wandb.Table(
        columns=["set", *next(iter(result["correlations"].values()))[0]],
        data=[[name, *row.values()] for name, rows in result["correlations"].items() for row in rows])
    run.log(logged)
    run.finish()
    print(f"W&B run logged ({args.wandb_mode}) under {args.work_dir}/wandb")


if __name__ == "__main__":
    main()
