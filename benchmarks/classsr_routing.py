"""Where a trained ClassSR model's PSNR goes: its classifier's routing against routings of the same branches that
know the answer, on held-out images (CPU).

    python benchmarks/classsr_routing.py --ckpt_path RUN/checkpoints/last.ckpt --test /data/SunHays20 /data/Set14
                                         [--reference RUN/reference/reference.ckpt] [--penalties 0 0.01 0.05 0.2]
                                         [--json routing.json]

Every branch (and the -O model, ``--reference``; default the run's ``reference/reference.ckpt``) runs once on
every 32×32 LR tile of each image (the model's own tiling: patch, stride, overlap averaging), and each routing
below is stitched from those outputs (``_routing_replay``), so it is exactly what routed inference with that
choice gives:

- ``classifier``: the model's classifier (argmax), i.e. what ``effsr test`` reports for the routed model;
- ``branch k``: every tile to branch k (the branches alone, tiled);
- ``-O tiled``: every tile through -O;
- ``by -O class``: each tile's class by -O's RGB PSNR on it with the run's split thresholds (the split's
  definition of the classes applied to held-out tiles: an ideal classifier of the training labels);
- ``oracle λ``: per tile the branch minimising ``MSE_k / mean MSE_wide + λ · MACs_k / MACs_wide`` (Y MSE
  against the HR tile): the best routing of these branches at its cost, an upper bound for any classifier.

Per set: mean PSNR-Y, its gap to -O on the whole image (as the harness's -O row), FLOPs per 32×32 tile as %
of the wide branch (ClassSR's unit, the classifier included for every routing that needs one) and the class
shares. The question it answers: is a gap to -O in the branches (no routing of them reaches -O at ≤ 75 %) or
in the classifier (the oracle does, the classifier does not)?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _routing_replay import Recorder, Replay, SequencePolicy, constant_policy  # noqa: E402

from effsr.cli import load_module_from_config  # noqa: E402
from effsr.data import SRDataModule  # noqa: E402
from effsr.inference.tiling import routed_forward, tile_grid  # noqa: E402
from effsr.methods.classsr import ClassSRModule  # noqa: E402
from effsr.methods.classsr.cost import routed_costs  # noqa: E402
from effsr.methods.classsr.split import split_by_thresholds  # noqa: E402
from effsr.methods.nm_adaptive.estimator import patch_mse  # noqa: E402
from effsr.metrics import psnr  # noqa: E402


def load_run_model(ckpt_path: Path) -> Any:
    """The module of a checkpoint, from the ``config.yaml`` of its run folder (beside it or one level up)."""
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / "config.yaml").is_file():
            return load_module_from_config(["--config", str(folder / "config.yaml")], str(ckpt_path))
    raise SystemExit(f"{ckpt_path}: no config.yaml beside it or in its run folder; pass a run's checkpoint")


def tile_outputs(module: ClassSRModule, networks: list[Any], lr: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """Every network's outputs on every routing tile of ``lr`` (network pixel range), the tiles, and the
    classifier's choice per tile."""
    outputs, tiles = [], torch.empty(0)
    for network in networks:
        recorder = Recorder(network)
        routed_forward(lr, [recorder], module.scale, constant_policy(0), patch_size=module.patch_size,
                       overlap=module.patch_size - module.stride)
        outputs.append(torch.cat(recorder.outputs))
        tiles = torch.cat(recorder.tiles)
    with torch.no_grad():
        classifier = module.network.classifier(tiles).argmax(dim=1)
    return outputs, tiles, classifier


def hr_tiles(module: ClassSRModule, lr: Tensor, hr: Tensor) -> Tensor:
    """The HR tiles under the routing tiles of ``lr``, in routed_forward's order (row-major corners)."""
    size, scale = module.patch_size, module.scale
    corners = tile_grid(lr.shape[-2], lr.shape[-1], size, module.stride)
    return torch.cat([hr[..., y * scale:(y + size) * scale, x * scale:(x + size) * scale] for y, x in corners])


def stitched_psnr(module: ClassSRModule, lr: Tensor, hr: Tensor, outputs: list[Tensor], choices: Tensor) -> float:
    replays = [Replay(output, choices, index) for index, output in enumerate(outputs)]
    routed = routed_forward(lr, replays, module.scale, SequencePolicy(choices), patch_size=module.patch_size,
                            overlap=module.patch_size - module.stride)
    sr = (routed.sr / module.pixel_range).clamp(0, 1)
    return float(psnr(sr, hr, crop_border=module.scale, y_channel=True)[0])


def evaluate_set(module: ClassSRModule, reference: Any, loader: Any, penalties: list[float]) -> dict[str, Any]:
    """Mean PSNR-Y, FLOPs % of wide and shares of every routing on one set, and -O on whole images."""
    branches = [branch.eval() for branch in module.network.branches]
    k = len(branches)
    shares_flops = lambda counts, classifier: (  # noqa: E731
        routed_costs(module.network, (counts / counts.sum()).tolist(), patch_size=module.patch_size,
                     stride=module.stride, classifier=classifier)["flops_classsr_percent_of_wide"])
    relative_macs = torch.tensor(routed_costs(module.network, [1.0] + [0.0] * (k - 1), classifier=False)[
        "macs_per_lr_patch_32_per_branch"], dtype=torch.float64)
    relative_macs = relative_macs / relative_macs[-1]
    routes: dict[str, dict[str, Any]] = {}
    whole_o = []
    ratio = reference.pixel_range / module.pixel_range

    def o_network(tiles: Tensor) -> Tensor:  # -O on tiles in the ClassSR network's pixel range
        return reference.network(tiles * ratio) / ratio

    def add(name: str, value: float, choices: Tensor, classifier: bool) -> None:
        route = routes.setdefault(name, {"psnr": [], "counts": torch.zeros(k, dtype=torch.float64),
                                         "classifier": classifier})
        route["psnr"].append(value)
        route["counts"] += torch.bincount(choices, minlength=k).double()

    for batch in loader:
        lr, hr = batch["lr"].float(), batch["hr"].float()
        if lr.max() > 1.5:  # uint8 values
            lr, hr = lr / 255.0, hr / 255.0
        scaled = lr * module.pixel_range
        with torch.no_grad():
            whole = (reference.network(lr * reference.pixel_range) / reference.pixel_range).clamp(0, 1)
        whole_o.append(float(psnr(whole, hr, crop_border=module.scale, y_channel=True)[0]))
        if min(lr.shape[-2:]) < module.patch_size:
            raise SystemExit(f"{batch['name'][0]}: LR {tuple(lr.shape[-2:])} is smaller than the routing tile "
                             f"{module.patch_size}")
        outputs, tiles, classifier = tile_outputs(module, [*branches, o_network], scaled)
        branch_outputs, o_output = outputs[:k], outputs[k]
        target = hr_tiles(module, lr, hr) * module.pixel_range
        add("classifier", stitched_psnr(module, scaled, hr, branch_outputs, classifier), classifier, True)
        for index in range(k):
            constant = torch.full_like(classifier, index)
            add(f"branch {index}", stitched_psnr(module, scaled, hr, branch_outputs, constant), constant, False)
        o_choice = torch.zeros_like(classifier)
        add("-O tiled", stitched_psnr(module, scaled, hr, [o_output], o_choice), torch.full_like(classifier, k - 1),
            False)
        o_scores = psnr((o_output / module.pixel_range).clamp(0, 1), (target / module.pixel_range).clamp(0, 1),
                        crop_border=module.scale, y_channel=False).numpy()
        by_class = torch.as_tensor(split_by_thresholds(o_scores, module.split_thresholds), dtype=torch.long)
        add("by -O class", stitched_psnr(module, scaled, hr, branch_outputs, by_class), by_class, True)
        mse = torch.stack([patch_mse(output, target, module.pixel_range, True) for output in branch_outputs],
                          dim=1).double()
        normalised = mse / mse[:, -1].mean().clamp_min(1e-12)
        for penalty in penalties:
            choice = (normalised + penalty * relative_macs[None]).argmin(dim=1)
            add(f"oracle λ={penalty:g}", stitched_psnr(module, scaled, hr, branch_outputs, choice), choice, True)
    o_mean = sum(whole_o) / len(whole_o)
    rows = {"-O (whole image)": {"psnr_y": o_mean, "delta_vs_O": 0.0, "flops_percent_of_O": 100.0, "shares": None}}
    for name, route in routes.items():
        value = sum(route["psnr"]) / len(route["psnr"])
        rows[name] = {"psnr_y": value, "delta_vs_O": value - o_mean,
                      "flops_percent_of_O": shares_flops(route["counts"], route["classifier"]),
                      "shares": (route["counts"] / route["counts"].sum()).tolist()}
    return {"images": len(whole_o), "routes": rows}


def print_set(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name} ({result['images']} images)")
    print(f"{'routing':<22}{'PSNR-Y':>9}{'vs -O':>9}{'FLOPs %':>9}  shares narrow→wide [%]")
    for route, row in result["routes"].items():
        shares = "" if row["shares"] is None else "/".join(f"{100 * share:.0f}" for share in row["shares"])
        print(f"{route:<22}{row['psnr_y']:>9.3f}{row['delta_vs_O']:>+9.3f}{row['flops_percent_of_O']:>9.1f}  {shares}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a ClassSR run's checkpoints/last.ckpt")
    parser.add_argument("--reference", type=Path, default=None,
                        help="the -O model's checkpoint (default: the run's reference/reference.ckpt)")
    parser.add_argument("--test", nargs="+", required=True, help="held-out image folders (HR)")
    parser.add_argument("--penalties", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
                        help="λ of the oracle routings (MACs weight against the wide branch's mean tile MSE)")
    parser.add_argument("--json", type=Path, default=None, help="write the tables as JSON")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    module = load_run_model(args.ckpt_path)
    if not isinstance(module, ClassSRModule):
        raise SystemExit(f"--ckpt_path {args.ckpt_path}: a {type(module).__name__}, not a ClassSR checkpoint")
    if not module.split_thresholds:
        raise SystemExit(f"--ckpt_path {args.ckpt_path}: has no split thresholds (was its split phase run?)")
    reference_path = args.reference or args.ckpt_path.parent.parent / "reference" / "reference.ckpt"
    if not reference_path.is_file():
        raise SystemExit(f"--reference {reference_path}: no such file; pass the run's -O checkpoint")
    reference = load_run_model(reference_path)
    data = SRDataModule(scale=module.scale, test_sets=list(args.test))
    data.setup("test")
    results = {}
    for name, loader in zip(args.test, data.test_dataloader(), strict=True):
        results[Path(name).name] = evaluate_set(module, reference, loader, args.penalties)
        print_set(Path(name).name, results[Path(name).name])
    if args.json:
        args.json.write_text(json.dumps({"ckpt_path": str(args.ckpt_path), "reference": str(reference_path),
                                         "split_thresholds": module.split_thresholds, "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
