"""All four methods and their baselines on one protocol: the harness's cached runs through ``effsr compare``.

    python benchmarks/compare_methods.py [--train DIR ...] [--test DIR ...] [--work-dir W ...]
                                         [--smsr_release CKPT] [--docs docs/comparison.md] [--no-docs]

Nothing is trained here. For every reproduction of ``benchmarks/_reproduce_experiments.py`` (not the harness
self-test) the final checkpoint of each declared method and baseline (``--variants``: also the variants) is
looked up in the harness's cache, ``W/runs/<model>/seed0-<key>/stage<i>/finished.json`` (seed 0 only; the key
computed by ``benchmarks/reproduce.py`` from the stage configs, the seed and the training data), trying the
training data ``--train``, then what the experiment's ``W/EXPERIMENT.json`` records, then ``sample``. A model
whose run is missing is left out and the ``reproduce.py`` command that makes it is printed. The models found
at one scale (each reproduction runs at the scale it was declared at), bicubic and, at ×2, the converted SMSR
release (``--smsr_release``, evaluated with ``experiments/smsr_x2.yaml``) go through one ``effsr compare`` run
per scale on the same ``--test`` sets, so the CPU latencies of a scale come from one process.

Writes ``W/compare_methods/x<scale>/`` (compare.json, per-model test_results.json), ``W/compare_methods.json``,
one W&B run (offline without credentials; ``--no-wandb`` to skip) with the table and PSNR-Y vs GMACs / vs CPU ms
scatters, and ``docs/comparison.md`` with the table, one PNG per scale in ``docs/comparison/`` and the reading:
the factual part is generated, the interpretation between ``<!-- reading begin/end -->`` is kept across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _compare_report import Row, facts, log_wandb, markdown_table, plot, write_docs  # noqa: E402
from _reproduce_experiments import EXPERIMENTS, Experiment, ModelDecl  # noqa: E402
from reproduce import _data_arg, cache_key  # noqa: E402

from effsr.cost import lr_size_for_720p  # noqa: E402

SMSR_RELEASE_CONFIG = "experiments/smsr_x2.yaml"
# Published SMSR ×2 (docs/methods/smsr.md: Y-PSNR / SSIM, sparse GMACs@720p at the mean measured sparsity).
SMSR_PAPER = {"sets": {"Set5": (38.00, 0.9601), "Set14": (33.64, 0.9179)}, "gmacs": 131.6, "params": 985e3}
# The unit each paper reports its cost in (docs/protocol.md#cost), by the module class of the model's config.
PAPER_COST = {
    "SMSRModule": "SMSR FLOPs = MACs@720p, sparse",
    "ClassSRModule": "ClassSR FLOPs = 2×MACs per 32×32 LR patch",
    "NMSparsityModule": "SLS FLOPs = MACs@720p",
    "AdaptiveNMModule": "SLS FLOPs = MACs@720p",
    "ASSLModule": "ASSL Mult-Adds@720p",
}

def work_dirs(args: argparse.Namespace) -> list[Path]:
    return [Path(folder).resolve() for folder in args.work_dir]


def experiment_trains(experiment: Experiment, args: argparse.Namespace) -> list[list[str]]:
    """The training data to look the experiment's runs up with, in order: ``--train``, what its
    ``W/EXPERIMENT.json`` recorded (each work dir), and the harness default ``sample``."""
    candidates = [list(args.train)] if args.train else []
    for work in work_dirs(args):
        record = work / f"{experiment.name}.json"
        if record.is_file():
            candidates.append(list(json.loads(record.read_text())["train"]))
    candidates.append(["sample"])
    return [train for index, train in enumerate(candidates) if train not in candidates[:index]]


def cached_checkpoint(decl: ModelDecl, train: list[str], works: list[Path]) -> tuple[Path | None, str | None]:
    """The final checkpoint of ``decl``'s cached run (seed 0) and a note, or (None, None) when none finished.

    The run of the current cache key comes first; else a finished run of the model on the same training data
    under another key (its stage config text changed since it was trained) is used and the note says so.
    """
    seed = 0 if decl.seeded else None
    prefix, last = "unseeded" if seed is None else f"seed{seed}", f"stage{len(decl.stages) - 1}"
    key = cache_key(decl, seed, train)
    for work in works:
        marker = work / "runs" / decl.name / f"{prefix}-{key[:12]}" / last / "finished.json"
        if decl.stages[-1].shared:  # reproduce.py's layout of a stage shared by several models: no seed
            shared = dataclasses.replace(decl, compare_as=None)
            marker = work / "shared" / cache_key(shared, None, train)[:12] / last / "finished.json"
        if marker.is_file():
            return Path(json.loads(marker.read_text())["checkpoint"]), None
    data = f"--data.train={_data_arg(train)}"
    for work in works:
        for marker in sorted((work / "runs" / decl.name).glob(f"{prefix}-*/{last}/finished.json")):
            record = json.loads(marker.read_text())
            if data in record.get("command", []):
                return Path(record["checkpoint"]), (f"{decl.name}: run {marker.parent.parent.name} (same data, "
                                                    "but trained under an older stage config or overrides than "
                                                    "the current declaration)")
    return None, None


def find_models(args: argparse.Namespace) -> tuple[dict[int, list[Row]], list[str], list[str]]:
    """Per scale: the comparison's models (name, experiment, role, MODEL argument); what is missing; notes."""
    by_scale: dict[int, list[Row]] = {}
    missing: list[str] = []
    notes: list[str] = []
    reported: set[tuple[int, str]] = set()  # experiments declared over the same runs report a missing one once
    for experiment in (item for item in EXPERIMENTS.values() if not item.test_only):
        trains = experiment_trains(experiment, args)
        found: dict[str, Path] = {}
        for decl in (decl for decl in experiment.models if decl.stages):
            for train in trains:
                checkpoint, note = cached_checkpoint(decl, train, work_dirs(args))
                if checkpoint is not None:
                    found[decl.name] = checkpoint
                    notes += [note] if note and note not in notes else []
                    break
        rows = by_scale.setdefault(experiment.scale, [])
        absent = []
        for decl in (decl for decl in experiment.models if decl.role != "variant" or args.variants):
            if decl.compare_as:
                argument = decl.compare_as if decl.compare_as == "bicubic" else str(REPO / decl.compare_as)
                name = "bicubic" if decl.compare_as == "bicubic" else f"{experiment.name}:{decl.name}"
            elif decl.from_run and decl.from_run[0] in found:
                argument = str(found[decl.from_run[0]].parent.parent / decl.from_run[1])
                name = f"{experiment.name}:{decl.name}"
            elif decl.name in found:
                argument, name = str(found[decl.name]), f"{experiment.name}:{decl.name}"
            else:
                absent.append(decl.name)
                continue
            if argument != "bicubic" and not Path(argument).is_file():
                absent.append(decl.name)
                continue
            if all(row["name"] != name and row["argument"] != argument for row in rows):  # nm_x4_b25 = nm_x4's
                rows.append({"name": name, "experiment": "–" if name == "bicubic" else experiment.name,
                             "role": decl.role, "argument": argument})
        absent = [name for name in absent if (experiment.scale, name) not in reported]
        reported.update((experiment.scale, name) for name in absent)
        if absent:
            started = [work for work in work_dirs(args)
                       if any((work / "runs" / decl.name).is_dir() for decl in experiment.models)]
            command = shlex.join(["python", "benchmarks/reproduce.py", experiment.name, "--train", *trains[0],
                                  "--work-dir", str((started or work_dirs(args))[0])])
            missing.append(f"{experiment.name}: no cached run of {', '.join(absent)} (make it: `{command}`)")
    if args.smsr_release:
        by_scale.setdefault(2, []).append({"name": "smsr_release", "experiment": "SMSR release", "role": "release",
                                           "argument": f"{Path(args.smsr_release).resolve()}@"
                                                       f"{REPO / SMSR_RELEASE_CONFIG}"})
    for scale, rows in by_scale.items():
        if all(row["name"] != "bicubic" for row in rows):
            rows.append({"name": "bicubic", "experiment": "–", "role": "baseline", "argument": "bicubic"})
        by_scale[scale] = rows
    found = {scale: rows for scale, rows in sorted(by_scale.items()) if any(r["name"] != "bicubic" for r in rows)}
    return found, missing, notes


def run_compare(scale: int, rows: list[Row], args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """One ``effsr compare`` subprocess for the models of ``scale``; returns its compare.json."""
    output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "effsr.cli", "compare", "--scale", str(scale), "--test_sets",
               json.dumps(args.test), "--output_dir", str(output), "--latency_repeats", str(args.latency_repeats),
               "--threads", str(args.threads), "--no_cuda_latency", "--title", f"compare_methods_x{scale}", "--",
               *(f"{row['name']}={row['argument']}" for row in rows)]
    print(f"[compare_methods] ×{scale}: {len(rows)} models ({output / 'compare.log'})", flush=True)
    with (output / "compare.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        tail = "".join((output / "compare.log").read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"effsr compare failed ({code}): {shlex.join(command)}\n{tail}")
    return json.loads((output / "compare.json").read_text())


def paper_cost(entry: dict[str, Any], set_name: str, experiment: str, scale: int) -> tuple[float, str]:
    """(value in G, unit) of the model's cost as its paper reports it, from its config class and test results.

    ClassSR's paper reports its baselines (the -O model, the branches) in its own unit too: for a plain conv
    network, 2 × MACs@720p × 32² / (LR pixels at 720p) is exactly 2 × the MACs of one 32×32 LR patch.
    """
    from effsr.cli_support import composed_yaml

    config = composed_yaml(entry["configs"][-1]) if entry["configs"] else {}  # a per-scale config with its recipe
    module = str(((config or {}).get("model") or {}).get("class_path", "")).rsplit(".", 1)[-1]
    macs = float(entry["sets"][set_name]["macs_720p"] or 0.0)
    if module == "ClassSRModule" or experiment.startswith("classsr"):
        results = json.loads(Path(entry["test_results"]).read_text())[set_name]
        height, width = lr_size_for_720p(scale)
        flops = results.get("flops_classsr", 2.0 * macs * 32 * 32 / (height * width))
        return float(flops) / 1e9, PAPER_COST["ClassSRModule"]
    return macs / 1e9, PAPER_COST.get(module, "MACs@720p")


def table_rows(scale: int, rows: list[Row], report: dict[str, Any]) -> list[Row]:
    """One record per (model, set) with everything the table, the plots and W&B show."""
    declared = {row["name"]: row for row in rows}
    records = []
    for entry in report["models"]:
        for set_name, values in entry["sets"].items():
            cost, unit = paper_cost(entry, set_name, declared[entry["name"]]["experiment"], scale)
            records.append({"scale": scale, "model": entry["name"], **{k: declared[entry["name"]][k] for k in
                            ("experiment", "role")}, "set": set_name, "n_images": values["n_images"],
                            "psnr_y": values["psnr_y"], "ssim_y": values["ssim_y"],
                            "gmacs_720p": (values["macs_720p"] or 0.0) / 1e9, "params": values["params"] or 0,
                            "cpu_ms_720p": entry["latency_ms_720p"], "paper_cost_g": cost, "paper_cost_unit": unit,
                            "measured": True})
    if scale == 2 and any(row["name"] == "smsr_release" for row in rows):
        for set_name, (psnr, ssim) in SMSR_PAPER["sets"].items():
            records.append({"scale": 2, "model": "smsr_paper", "experiment": "SMSR paper (published)",
                            "role": "published", "set": set_name, "n_images": None, "psnr_y": psnr, "ssim_y": ssim,
                            "gmacs_720p": SMSR_PAPER["gmacs"], "params": SMSR_PAPER["params"], "cpu_ms_720p": None,
                            "paper_cost_g": SMSR_PAPER["gmacs"], "paper_cost_unit": PAPER_COST["SMSRModule"],
                            "measured": False})
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/compare_methods.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", default=None,
                        help="training data of the cached runs (tried first; then what each W/EXPERIMENT.json records, "
                             "then `sample`)")
    parser.add_argument("--test", nargs="+", default=["sample"], help="test HR folders (set name = folder name)")
    parser.add_argument("--work-dir", dest="work_dir", nargs="+", default=["runs/reproduce"],
                        help="harness work dirs to look in (first: where outputs go)")
    parser.add_argument("--smsr_release", default=None, help="converted SMSR ×2 release (effsr convert --method smsr)")
    parser.add_argument("--variants", action="store_true",
                        help="also the experiments' variants (default: each method and its baselines)")
    parser.add_argument("--scales", type=int, nargs="+", default=None,
                        help="evaluate only these scales; the others keep the previous run's rows (its command is "
                             "named in the docs)")
    parser.add_argument("--latency-repeats", dest="latency_repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the test loops and latency runs")
    parser.add_argument("--docs", default=str(REPO / "docs" / "comparison.md"), help="Markdown file to write")
    parser.add_argument("--no-docs", dest="no_docs", action="store_true", help="do not touch the docs")
    parser.add_argument("--no-wandb", dest="no_wandb", action="store_true", help="no W&B run")
    return parser


def carried_scales(args: argparse.Namespace, by_scale: dict[int, list[Row]]) -> dict[int, dict[str, Any]]:
    """Scales left out by ``--scales``: their records (and command) from the previous ``W/compare_methods.json``."""
    previous_path = work_dirs(args)[0] / "compare_methods.json"
    if not args.scales or not previous_path.is_file():
        return {}
    previous = json.loads(previous_path.read_text())
    command = previous.get("carried", {}).get("0") or previous["command"]
    carried = {}
    for scale in (scale for scale in by_scale if scale not in args.scales):
        records = [record for record in previous["records"] if record["scale"] == scale]
        if records:
            carried[scale] = {"records": records, "command": previous.get("carried", {}).get(str(scale), command)}
    return carried


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    by_scale, missing, notes = find_models(args)
    for line in missing:
        print(f"[compare_methods] missing: {line}", flush=True)
    for line in notes:
        print(f"[compare_methods] note: {line}", flush=True)
    if not by_scale:
        raise SystemExit("no cached method runs found in " + ", ".join(map(str, work_dirs(args))))
    output = work_dirs(args)[0] / "compare_methods"
    docs = Path(args.docs)
    records: list[Row] = []
    pngs: list[Path] = []
    cpu = ""
    carried = carried_scales(args, by_scale)
    for scale, rows in by_scale.items():
        if scale in carried:
            records += carried[scale]["records"]
            pngs.append((docs.parent / "comparison" if not args.no_docs else output) / f"x{scale}.png")
            continue
        report = run_compare(scale, rows, args, output / f"x{scale}")
        cpu = report["latency"]["cpu"]
        scale_records = table_rows(scale, rows, report)
        records += scale_records
        png = (docs.parent / "comparison" if not args.no_docs else output) / f"x{scale}.png"
        plot(scale, scale_records, png)
        pngs.append(png)
    result = {"command": "python benchmarks/compare_methods.py " + shlex.join(argv), "test": args.test, "cpu": cpu,
              "threads": args.threads, "latency_repeats": args.latency_repeats, "missing": missing, "notes": notes,
              "models": by_scale, "records": records, "facts": facts(records), "pngs": [str(p) for p in pngs],
              "carried": {scale: value["command"] for scale, value in carried.items()}}
    result["wandb_run"] = None if args.no_wandb else str(log_wandb(records, pngs, output))
    (work_dirs(args)[0] / "compare_methods.json").write_text(json.dumps(result, indent=2, default=str))
    print(markdown_table(records))
    print("\n".join(result["facts"]))
    if not args.no_docs:
        write_docs(docs, records, result, pngs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
