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
The pieces are in ``benchmarks/_nm_adaptive_members.py`` (image pairs, crops, members trained or loaded) and
``benchmarks/_nm_adaptive_eval.py`` (tile pool, estimators, routing tiles, replayed routings, curves); this script
runs them and reports (table, PNG, JSON, W&B).

    python benchmarks/nm_adaptive.py --images ../shared/data/benchmarks --work-dir runs/nm_adaptive_bench \\
        --output docs/nm_adaptive_curve.png [--wandb]
    python benchmarks/nm_adaptive.py --members DENSE.ckpt SLS25.ckpt SLS125.ckpt --features 32 --m 32 \\
        --train_sets /data/BSD68 --eval_sets /data/SunHays20 /data/Set14 --json curve.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _nm_adaptive_eval import (  # noqa: E402
    estimator_quality,
    print_curves,
    set_curves,
    tile_image,
    tile_pool,
    train_estimators,
)
from _nm_adaptive_members import SCALE, build_members, load_members, load_pairs, signature  # noqa: E402

from effsr.cost import count_macs, lr_size_for_720p, macs_at_720p  # noqa: E402
from effsr.methods.nm_adaptive import NMEnsemble  # noqa: E402
from effsr.methods.nm_adaptive.ensemble import member_cost, member_structure  # noqa: E402


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
