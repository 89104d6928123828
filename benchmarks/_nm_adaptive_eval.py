"""benchmarks/nm_adaptive.py's estimators and evaluation: the tile pool with every member's actual MSE, the
estimators' training, held-out images cut into routing tiles with every member's output recorded, routings
replayed from those outputs (:class:`Replay`), the curves per set and their printed tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _nm_adaptive_members import SCALE, Pair, random_crops
from _routing_replay import Recorder, Replay, SequencePolicy, constant_policy
from torch import Tensor

from effsr.inference.tiling import routed_forward, tile_grid
from effsr.methods.nm_adaptive import NMEnsemble, patch_mse, rank_correlation
from effsr.metrics import psnr


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
