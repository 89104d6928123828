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
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _reproduce_experiments import EXPERIMENTS, Experiment, ModelDecl  # noqa: E402
from reproduce import _data_arg, cache_key  # noqa: E402

from effsr.compare.plot import pareto_front  # noqa: E402
from effsr.cost import lr_size_for_720p  # noqa: E402

Row = dict[str, Any]
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
WHY_SCALE = {
    "smsr_x2": "SMSR's released checkpoint and its main table are ×2",
    "classsr_x4": "ClassSR is defined and published at ×4 only (32×32 LR → 128×128 patches)",
    "nm_x4": "the SLS tables report ×4 first",
    "assl_x2": "ASSL's main table opens with ×2",
    "edsr_small_x2": "the demo recipe's reproduction, ×2",
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


def markdown_table(records: list[Row]) -> str:
    """The one table: a row per model, PSNR-Y / SSIM per set, cost as executed and as each paper reports it."""
    sets = list(dict.fromkeys(record["set"] for record in records))
    lines = ["| scale | model | from | " + " | ".join(f"{name} PSNR-Y / SSIM" for name in sets)
             + " | GMACs@720p (executed) | params | CPU ms@720p | cost as its paper reports it |",
             "|---|---|---|" + "---:|" * len(sets) + "---:|---:|---:|---|"]
    models = list(dict.fromkeys((record["scale"], record["model"]) for record in records))
    for scale, model in models:
        mine = {record["set"]: record for record in records if (record["scale"], record["model"]) == (scale, model)}
        first = next(iter(mine.values()))
        cells = [f"{mine[name]['psnr_y']:.2f} / {mine[name]['ssim_y']:.4f}" if name in mine else "–" for name in sets]
        gmacs = sorted({round(record["gmacs_720p"], 3) for record in mine.values()})
        executed = f"{gmacs[0]:.3f}" if len(gmacs) == 1 else f"{gmacs[0]:.3f}–{gmacs[-1]:.3f} (per set)"
        costs = sorted({round(record["paper_cost_g"], 4) for record in mine.values()})
        cost = f"{costs[0]:.4g}" if len(costs) == 1 else f"{costs[0]:.4g}–{costs[-1]:.4g}"
        latency = f"{first['cpu_ms_720p']:.0f}" if first["cpu_ms_720p"] is not None else "–"
        params = f"{first['params'] / 1e3:.1f}K"
        if not first["measured"]:
            executed, latency = f"{first['gmacs_720p']:.1f} (published)", "–"
        lines.append(f"| ×{scale} | {model} | {first['experiment']} | " + " | ".join(cells)
                     + f" | {executed} | {params} | {latency} | {cost} G {first['paper_cost_unit']} |")
    return "\n".join(lines)


def fronts(records: list[Row], key: str) -> list[str]:
    """Names on the PSNR-Y Pareto front against ``key`` (measured rows of one scale and set)."""
    points = [(record["model"], float(record[key]), float(record["psnr_y"])) for record in records
              if record["measured"] and record[key] is not None]
    return [name for name, _, _ in pareto_front(points)]


def facts(records: list[Row]) -> list[str]:
    """The generated, factual part of the reading: fronts by MACs and by latency, dB per GMAC over bicubic."""
    sentences = []
    for scale, set_name in dict.fromkeys((record["scale"], record["set"]) for record in records):
        group = [record for record in records if (record["scale"], record["set"]) == (scale, set_name)]
        if not any(record["measured"] for record in group):
            continue
        by_macs, by_ms = fronts(group, "gmacs_720p"), fronts(group, "cpu_ms_720p")
        base = next((record for record in group if record["model"] == "bicubic"), None)
        gains = []
        for record in group:
            if base and record["measured"] and record["model"] != "bicubic" and record["gmacs_720p"] > 0:
                gain = record["psnr_y"] - base["psnr_y"]
                gains.append(f"{record['model']} {gain:+.2f} dB = {gain / record['gmacs_720p']:.3f} dB/GMAC, "
                             f"{100 * gain / record['cpu_ms_720p']:.3f} dB/100 ms")
        disagree = sorted(set(by_macs) ^ set(by_ms))
        sentences.append(f"×{scale} {set_name}: Pareto front by GMACs {', '.join(by_macs)}; by CPU ms "
                         f"{', '.join(by_ms)}" + (f" (on one front only: {', '.join(disagree)})" if disagree else "")
                         + (f". Over bicubic: {'; '.join(gains)}." if gains else "."))
    return sentences


def plot(scale: int, records: list[Row], path: Path) -> None:
    """PSNR-Y vs GMACs@720p (log) and vs CPU ms@720p, one column per set, Pareto fronts dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(record["set"] for record in records))
    names = list(dict.fromkeys(record["model"] for record in records))
    figure, axes = plt.subplots(2, len(sets), figsize=(5.0 * len(sets), 8.0), squeeze=False)
    for column, set_name in enumerate(sets):
        group = [record for record in records if record["set"] == set_name]
        for row, (key, label) in enumerate((("gmacs_720p", "GMACs for a 1280×720 output (log)"),
                                            ("cpu_ms_720p", "CPU ms for a 1280×720 output (log)"))):
            axis = axes[row][column]
            points = [(r["model"], max(float(r[key]), 1e-3), r["psnr_y"], r["measured"]) for r in group
                      if r[key] is not None]
            for name, x, y, measured in points:
                index = names.index(name)
                axis.scatter([x], [y], marker="osD^vP*Xph<>"[index % 12], s=45, color=f"C{index % 10}",
                             facecolors="none" if not measured else None, zorder=3, label=name)
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 if measured else -11), fontsize=7)
            front = pareto_front([(n, x, y) for n, x, y, measured in points if measured])
            axis.plot([x for _, x, _ in front], [y for _, _, y in front], "--", color="0.5", lw=1, zorder=2)
            axis.set_xscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("PSNR-Y [dB]")
            axis.set_title(f"×{scale} {set_name}")
            axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"×{scale}: PSNR-Y vs cost (hollow: published, not measured)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def log_wandb(records: list[Row], pngs: list[Path], output: Path) -> Path:
    """One W&B run: the table, PSNR-Y vs GMACs and vs CPU ms scatters per scale and set, the PNGs."""
    import wandb

    from effsr.loggers import ensure_wandb_mode

    ensure_wandb_mode()
    columns = ["scale", "model", "experiment", "role", "set", "n_images", "psnr_y", "ssim_y", "gmacs_720p", "params",
               "cpu_ms_720p", "paper_cost_g", "paper_cost_unit"]
    run = wandb.init(project="effsr-compare", name="compare_methods", dir=str(output), job_type="compare_methods")
    try:
        data = [[record[column] for column in columns] for record in records]
        logged: dict[str, Any] = {"compare_methods/table": wandb.Table(columns=columns, data=data)}
        for scale, set_name in dict.fromkeys((record[0], record[4]) for record in data):
            subset = wandb.Table(columns=columns, data=[row for row in data if (row[0], row[4]) == (scale, set_name)
                                                        and row[10] is not None])
            for key, what in (("gmacs_720p", "GMACs@720p"), ("cpu_ms_720p", "CPU ms@720p")):
                logged[f"compare_methods/x{scale}/{set_name}/psnr_y_vs_{key}"] = wandb.plot.scatter(
                    subset, key, "psnr_y", title=f"×{scale} {set_name}: PSNR-Y vs {what}")
        for png in pngs:
            logged[f"compare_methods/{png.stem}"] = wandb.Image(str(png))
        run.log(logged)
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def write_docs(docs: Path, records: list[Row], result: dict[str, Any], pngs: list[Path]) -> None:
    """docs/comparison.md; the hand-written interpretation between the reading markers is kept."""
    begin, end = "<!-- reading begin -->", "<!-- reading end -->"
    old = docs.read_text() if docs.is_file() else ""
    kept = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), old, re.DOTALL)
    reading = kept.group(1).strip() if kept else "_To be written after looking at the numbers._"
    scales = "\n".join(f"- ×{scale}: " + "; ".join(
        f"{name} ({WHY_SCALE.get(name, 'the scale its reproduction was declared at')})"
        for name in dict.fromkeys(row["experiment"] for row in rows if row["experiment"] in EXPERIMENTS))
        + ("; the converted SMSR release" if any(row["name"] == "smsr_release" for row in rows) else "")
        for scale, rows in result["models"].items())
    text = "\n".join([
        "# Same-protocol comparison of the methods", "",
        "Written by `benchmarks/compare_methods.py` (do not edit the generated parts; the reading between its "
        "markers is kept). Every measured row went through `effsr compare` (effsr's test loop: Y-PSNR/SSIM by "
        "the paper protocol, MACs counted on what runs, sparse and routed execution as executed); no model was "
        "trained for this page: the checkpoints are the reproduction harness's cached runs (seed 0).", "",
        f"- Command: `{result['command']}`",
        *(f"- ×{scale} rows: from the previous run, `{command}`" for scale, command in result["carried"].items()),
        f"- Test sets: {', '.join(f'`{item}`' for item in result['test'])}; LR by MATLAB bicubic",
        f"- CPU latency: {result['cpu']}, {result['threads']} thread(s), median of {result['latency_repeats']} "
        "runs of the inference path on one LR image of the 1280×720-output size, all models of a scale in one "
        "process (compare latencies within a scale only; the machine was shared)",
        "- Scales (each method at the scale its small-scale reproduction was declared at; models of different "
        "scales are never compared with each other):", scales, "",
        "Missing rows: " + ("; ".join(result["missing"]) if result["missing"] else "none."), "",
        *(["Notes: " + "; ".join(result["notes"]), ""] if result["notes"] else []),
        markdown_table(records), "",
        "GMACs@720p (executed) is what effsr counted on each set (data-dependent for SMSR and ClassSR). The last "
        "column is the same model's cost in its paper's unit (docs/protocol.md#cost): MACs for a 1280×720 output "
        "for SMSR, ASSL and SLS, ClassSR's FLOPs = 2 × the MACs of one 32×32 LR patch (mean over the routed "
        "patches, classifier included). `smsr_paper` is the SMSR paper's published ×2 row (not measured here).",
        "", *(f"![×{png.stem[1:]}](comparison/{png.name})" for png in pngs), "",
        "## Reading", "", "Generated facts:", "", *(f"- {sentence}" for sentence in result["facts"]), "",
        begin, reading, end, ""])
    docs.write_text(text)
    print(f"[compare_methods] wrote {docs}", flush=True)


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
