"""Adaptive N:M patch inference: PSNR-vs-MACs of routing over an ensemble against each single network.

Trains briefly on CPU (or loads, ``--load``) an ensemble of one backbone at several N:M budgets (dense → search →
finetune with :class:`effsr.methods.nm_sparsity.NMSparsityModule`), trains one MSE estimator per network on LR
patches, then sweeps the routing penalty λ and prints/plots Y-PSNR against measured MACs (per 1280×720 output) on
the evaluation images, next to each single network run through the same tiling.

    python benchmarks/nm_adaptive.py --images /path/to/benchmarks --output docs/nm_adaptive_curve.png
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from effsr.archs import EDSR
from effsr.cost import MacCounter, macs_at_720p
from effsr.inference.tiling import routed_forward
from effsr.methods.nm_sparsity import NMEnsemble, NMSparsityModule

SCALE = 4


def load_pairs(folder: Path) -> list[tuple[Tensor, Tensor]]:
    """(LR, HR) float [0, 1] pairs: HR mod-cropped to ×4, LR by MATLAB-compatible bicubic (effsr.ops) when
    available, else torch's antialiased bicubic."""
    pairs = []
    for path in sorted(folder.glob("*.png")):
        array = np.asarray(Image.open(path).convert("RGB"))
        height, width = array.shape[0] // SCALE * SCALE, array.shape[1] // SCALE * SCALE
        hr = torch.from_numpy(array[:height, :width].copy()).permute(2, 0, 1)[None].float() / 255
        try:
            from effsr.ops import imresize

            lr = imresize(hr, 1 / SCALE)
        except ImportError:
            lr = F.interpolate(hr, scale_factor=1 / SCALE, mode="bicubic", antialias=True, align_corners=False)
        pairs.append(((lr.clamp(0, 1) * 255).round() / 255, hr))
    if not pairs:
        raise SystemExit(f"no PNG images in {folder}")
    return pairs


def random_batch(pairs: list[tuple[Tensor, Tensor]], batch_size: int, patch: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random aligned LR/HR crops (pixel range [0, 255])."""
    lrs, hrs = [], []
    for _ in range(batch_size):
        lr, hr = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        y = int(torch.randint(lr.shape[-2] - patch + 1, (1,), generator=generator))
        x = int(torch.randint(lr.shape[-1] - patch + 1, (1,), generator=generator))
        lrs.append(lr[..., y:y + patch, x:x + patch])
        hrs.append(hr[..., y * SCALE:(y + patch) * SCALE, x * SCALE:(x + patch) * SCALE])
    return torch.cat(lrs) * 255, torch.cat(hrs) * 255


def train(module: NMSparsityModule, phases: list[tuple[str, int, float]], pairs: list[tuple[Tensor, Tensor]],
          batch_size: int, patch: int, seed: int) -> list[str]:
    """Runs (phase, max steps, lr) in order by hand; ``search`` ends early when the budget is reached."""
    generator = torch.Generator().manual_seed(seed)
    step, log = 0, []
    for name, steps, learning_rate in phases:
        module.enter_phase(name, {"lr": learning_rate})
        optimizer = module.configure_optimizers()
        for _ in range(steps):
            if name == "search" and module.phase_condition("budget_reached"):
                break
            lr, hr = random_batch(pairs, batch_size, patch, generator)
            module.before_step(step)
            loss, _ = module.training_loss(lr, hr, {})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        log.append(f"{name}: {step} steps total, cost fraction {module.cost_fraction():.3f}")
    return log


def train_estimators(ensemble: NMEnsemble, pairs: list[tuple[Tensor, Tensor]], steps: int, batch_size: int,
                     patch: int, seed: int) -> float:
    """Each estimator learns log(per-patch MSE) of its frozen network; returns the final L1 on log MSE."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(ensemble.estimators.parameters(), lr=2e-3)
    ensemble.members.eval()
    loss = torch.zeros(())
    for _ in range(steps):
        lr, hr = random_batch(pairs, batch_size, patch, generator)
        with torch.no_grad():
            target = torch.stack([((member(lr) - hr) / 255).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10).log()
                                  for member in ensemble.members], dim=1)
        predicted = torch.stack([estimator(lr) for estimator in ensemble.estimators], dim=1)
        loss = F.l1_loss(predicted, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def y_psnr(sr: Tensor, hr: Tensor) -> float:
    """Y-PSNR (BT.601, crop = scale) on uint8-rounded images, conventions.md."""
    def to_y(image: Tensor) -> Tensor:
        image = (image.clamp(0, 1) * 255).round().double() / 255
        return 16 + 65.481 * image[:, 0] + 128.553 * image[:, 1] + 24.966 * image[:, 2]

    difference = (to_y(sr) - to_y(hr))[..., SCALE:-SCALE, SCALE:-SCALE]
    return float(10 * torch.log10(255.0 ** 2 / difference.pow(2).mean()))


@torch.no_grad()
def evaluate(ensemble: NMEnsemble, pairs: list[tuple[Tensor, Tensor]], policy: object | None) -> dict[str, float]:
    """Mean Y-PSNR, MACs per 1280×720 output (measured, estimators included when routing) and route shares."""
    psnrs, macs, shares = [], [], torch.zeros(len(ensemble.members))
    for lr, hr in pairs:
        modules = [ensemble] if policy is None else list(ensemble.members)
        with MacCounter(*modules) as counter:
            routed = routed_forward(lr * 255, list(ensemble.members), SCALE, policy or ensemble.policy,
                                    patch_size=ensemble.patch_size, overlap=ensemble.overlap)
        psnrs.append(y_psnr(routed.sr / 255, hr))
        macs.append(counter.macs / (hr.shape[-2] * hr.shape[-1]) * 1280 * 720)
        shares += routed.proportions.float()
    return {"psnr_y": float(np.mean(psnrs)), "gmacs_720p": float(np.mean(macs)) / 1e9,
            "shares": (shares / len(pairs)).tolist()}


def constant_policy(index: int) -> object:
    return lambda patches: torch.full((patches.shape[0],), index, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/benchmarks"),
                        help="folder with Set14/ (training patches) and Set5/ (evaluation)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    parser.add_argument("--features", type=int, default=24)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--cost_weight", type=float, default=20.0, help="λ of the search (L1 is on [0, 255])")
    parser.add_argument("--dense_steps", type=int, default=500)
    parser.add_argument("--search_steps", type=int, default=150)
    parser.add_argument("--finetune_steps", type=int, default=100)
    parser.add_argument("--estimator_steps", type=int, default=250)
    parser.add_argument("--patch", type=int, default=24, help="LR training patch")
    parser.add_argument("--route_patch", type=int, default=32, help="LR routing patch (estimators train on it)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--penalties", type=float, nargs="+",
                        default=[0.0, 1e-5, 3e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 1e-2])
    parser.add_argument("--load", type=Path, default=None, help="ensemble state saved by --save (skips training)")
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("docs/nm_adaptive_curve.png"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    started = time.time()
    train_pairs, eval_pairs = load_pairs(args.images / "Set14"), load_pairs(args.images / "Set5")

    def backbone() -> EDSR:
        return EDSR(SCALE, num_features=args.features, num_blocks=args.blocks, pixel_range=255.0)

    def optimizer(params: object) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3)

    budgets = [1.0, *args.budgets]
    modules = [NMSparsityModule(backbone(), optimizer=optimizer, m=args.m, budget=budget, score_lr=0.05,
                                cost_weight=args.cost_weight, anneal_interval=5, anneal_threshold=0.02,
                                rerank_interval=20) for budget in budgets]
    if args.load is None:
        print("\n".join(train(modules[0], [("dense", args.dense_steps, 1e-3)], train_pairs, args.batch_size,
                              args.patch, 0)))
        for module in modules[1:]:
            module.network.load_state_dict(modules[0].network.state_dict())
            print(f"budget {module.budget}: " + "; ".join(train(
                module, [("search", args.search_steps, 5e-4), ("finetune", args.finetune_steps, 5e-4)],
                train_pairs, args.batch_size, args.patch, 1)))
        modules[0].enter_phase("finetune", {})
    if args.load is not None:
        for module, structure in zip(modules, torch.load(args.load, weights_only=False)["structures"], strict=True):
            module.rebuild_structure(structure)
    dense_macs = macs_at_720p(copy.deepcopy(backbone()).to("meta"), device="meta")
    costs = [module.cost_report()["macs_720p"] / dense_macs for module in modules]
    ensemble = NMEnsemble([module.network for module in modules], costs, estimator_features=16,
                          patch_size=args.route_patch, overlap=4)
    if args.load is not None:
        state = torch.load(args.load, map_location="cpu", weights_only=False)
        ensemble.load_state_dict(state["ensemble"])
        ensemble.costs.copy_(torch.tensor(costs))
    else:
        final = train_estimators(ensemble, train_pairs, args.estimator_steps, args.batch_size, args.route_patch,
                                 2)
        print(f"estimators: final L1 on log MSE {final:.3f}")
    if args.save:
        torch.save({"ensemble": ensemble.state_dict(),
                    "structures": [module.structure_state() for module in modules]}, args.save)
    patterns = [module.pattern() for module in modules]
    print(f"per-layer N (M={args.m}):")
    for budget, pattern in zip(budgets, patterns, strict=True):
        print(f"  budget {budget:<6} {list(pattern.values())}")
    singles = [evaluate(ensemble, eval_pairs, constant_policy(index)) for index in range(len(modules))]
    adaptive = []
    for penalty in args.penalties:
        ensemble.penalty = penalty
        adaptive.append({"penalty": penalty, **evaluate(ensemble, eval_pairs, None)})
    print(f"\n{'network':<24}{'cost':>7}{'GMACs@720p':>12}{'PSNR-Y':>9}  shares")
    for budget, cost, row in zip(budgets, costs, singles, strict=True):
        print(f"{'single budget ' + str(budget):<24}{cost:>7.3f}{row['gmacs_720p']:>12.3f}{row['psnr_y']:>9.3f}")
    for row in adaptive:
        shares = " ".join(f"{share:.2f}" for share in row["shares"])
        print(f"{'adaptive λ=' + format(row['penalty'], 'g'):<24}{'':>7}{row['gmacs_720p']:>12.3f}"
              f"{row['psnr_y']:>9.3f}  {shares}")
    above = above_line(singles, adaptive)
    print(f"\nadaptive points on/above the piecewise-linear line through the single networks: {above}")
    print(f"total time {time.time() - started:.0f} s")
    plot(singles, budgets, adaptive, args.output)
    if args.json:
        args.json.write_text(json.dumps({"singles": singles, "budgets": budgets, "costs": costs,
                                         "adaptive": adaptive, "patterns": patterns}, indent=2))


def above_line(singles: list[dict[str, float]], adaptive: list[dict[str, float]]) -> str:
    """How many adaptive points lie on/above the interpolation between single networks (by MACs)."""
    points = sorted((row["gmacs_720p"], row["psnr_y"]) for row in singles)
    xs, ys = [point[0] for point in points], [point[1] for point in points]
    inside = [row for row in adaptive if xs[0] <= row["gmacs_720p"] <= xs[-1]]
    count = sum(row["psnr_y"] >= float(np.interp(row["gmacs_720p"], xs, ys)) - 0.005 for row in inside)
    return f"{count}/{len(inside)} (points inside the single networks' MACs range)"


def plot(singles: list[dict[str, float]], budgets: list[float], adaptive: list[dict[str, float]],
         output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    points = sorted(zip([row["gmacs_720p"] for row in singles], [row["psnr_y"] for row in singles], budgets,
                        strict=True))
    axis.plot([p[0] for p in points], [p[1] for p in points], "o--", color="grey", label="single N:M networks")
    for x, y, budget in points:
        axis.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ordered = sorted(adaptive, key=lambda row: row["gmacs_720p"])
    axis.plot([row["gmacs_720p"] for row in ordered], [row["psnr_y"] for row in ordered], "s-", color="C1",
              label="adaptive routing (λ sweep)")
    axis.set_xlabel("GMACs per 1280×720 output (measured)")
    axis.set_ylabel("Y-PSNR on Set5 ×4 (dB)")
    axis.set_title("N:M ensemble: adaptive patch routing vs single networks")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    print(f"saved {output}")


if __name__ == "__main__":
    main()
