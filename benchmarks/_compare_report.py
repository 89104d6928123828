"""What ``benchmarks/compare_methods.py`` renders: the table, the generated reading, the plots, W&B, the docs page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from _reproduce_experiments import EXPERIMENTS

from effsr.compare.plot import pareto_front

Row = dict[str, Any]
WHY_SCALE = {
    "smsr_x2": "SMSR's released checkpoint and its main table are ×2",
    "classsr_x4": "ClassSR is defined and published at ×4 only (32×32 LR → 128×128 patches)",
    "nm_x4": "the SLS tables report ×4 first",
    "assl_x2": "ASSL's main table opens with ×2",
    "edsr_small_x2": "the demo recipe's reproduction, ×2",
}


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
