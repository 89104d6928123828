"""The outputs of a comparison: the console table, ``compare.json`` rows and the W&B run."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "format_table", "log_wandb", "model_entry", "table_rows", "TABLE_COLUMNS"]

SET_KEYS = ("psnr_y", "ssim_y", "psnr_rgb", "n_images", "macs_720p", "params")
TABLE_COLUMNS = ["model", "set", "n_images", "psnr_y", "ssim_y", "psnr_rgb", "gmacs_720p", "params",
                 "latency_ms_720p", "latency_ms_720p_cuda"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_entry(spec: Any, results: dict[str, Any], results_path: Path, latency_cpu: float,
                latency_cuda: float | None) -> dict[str, Any]:
    """One model of ``compare.json``: per-set metrics and cost from its test_results.json, plus latency.

    The model-level ``macs_720p`` is the mean of the per-set values (they differ only for data-dependent
    execution: sparse masks, routing) and ``params`` their maximum.
    """
    sets = {set_name: {key: row.get(key) for key in SET_KEYS} for set_name, row in results.items()}
    macs = [row["macs_720p"] for row in sets.values() if row.get("macs_720p") is not None]
    params = [row["params"] for row in sets.values() if row.get("params") is not None]
    return {
        "name": spec.name, "kind": spec.kind, "source": spec.source,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "configs": [str(config) for config in spec.configs],
        "macs_720p": sum(macs) / len(macs) if macs else None,
        "params": max(params) if params else None,
        "latency_ms_720p": latency_cpu, "latency_ms_720p_cuda": latency_cuda,
        "test_results": str(results_path), "sets": sets,
    }


def table_rows(models: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per (model, set) in :data:`TABLE_COLUMNS` order (MACs in G)."""
    rows = []
    for model in models:
        for set_name, row in model["sets"].items():
            macs = row.get("macs_720p")
            rows.append([model["name"], set_name, row["n_images"], row["psnr_y"], row["ssim_y"], row["psnr_rgb"],
                         macs / 1e9 if macs is not None else math.nan, row.get("params"),
                         model["latency_ms_720p"], model["latency_ms_720p_cuda"]])
    return rows


def _params(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


def format_table(models: list[dict[str, Any]], threads: int) -> str:
    """The console table; latency is for one 1280×720 output, median over the timed runs."""
    cuda = any(model["latency_ms_720p_cuda"] is not None for model in models)
    width = max([len("model"), *(len(model["name"]) for model in models)]) + 2
    header = (f"{'model':<{width}}{'set':<12}{'n':>4}{'PSNR-Y':>9}{'SSIM-Y':>9}{'PSNR-RGB':>10}{'GMACs@720p':>12}"
              f"{'params':>10}{f'CPU ms ({threads} thr)':>18}" + (f"{'CUDA ms':>10}" if cuda else ""))
    lines = [header, "-" * len(header)]
    for row in table_rows(models):
        name, set_name, count, psnr_y, ssim_y, psnr_rgb, gmacs, params, cpu_ms, cuda_ms = row
        line = (f"{name:<{width}}{set_name:<12}{count:>4}{psnr_y:>9.3f}{ssim_y:>9.4f}{psnr_rgb:>10.3f}{gmacs:>12.3f}"
                f"{_params(params):>10}{cpu_ms:>18.1f}")
        if cuda:
            line += f"{cuda_ms:>10.2f}" if cuda_ms is not None else f"{'-':>10}"
        lines.append(line)
    return "\n".join(lines)


def log_wandb(report: dict[str, Any], png: Path, output_dir: Path, project: str, run_name: str) -> Path:
    """One W&B run: the table (``wandb.Table``), a PSNR-Y vs GMACs scatter per set and the Pareto PNG.

    Without credentials or a reachable server the run is written offline (:func:`effsr.loggers.ensure_wandb_mode`);
    returns the run's folder.
    """
    from effsr.loggers import GroupScatter, log_wandb_table_run

    summary = {f"{model['name']}/{set_name}/psnr_y": row["psnr_y"]
               for model in report["models"] for set_name, row in model["sets"].items()}
    return log_wandb_table_run(
        project=project, run_name=run_name, output_dir=output_dir, job_type="compare",
        config={key: report[key] for key in ("scale", "test_sets", "latency")}, prefix="compare",
        columns=TABLE_COLUMNS, rows=table_rows(report["models"]), image=png, summary=summary,
        scatter=GroupScatter(x="gmacs_720p", y="psnr_y", group="set", key="compare/{group}/psnr_y_vs_gmacs",
                             title="{group}: PSNR-Y vs GMACs@720p"))
