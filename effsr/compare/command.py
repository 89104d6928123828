"""``effsr compare``: several models, one protocol, one table, ``compare.json`` and a Pareto plot."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import torch
import yaml

from effsr.cli_support import apply_thread_count
from effsr.compare.evaluate import evaluate_model, measure_latency_ms, safe_name
from effsr.compare.models import parse_models
from effsr.compare.plot import pareto_plot
from effsr.compare.report import cpu_model, format_table, log_wandb, model_entry
from effsr.cost import lr_size_for_720p
from effsr.errors import ConfigError

__all__ = ["build_parser", "compare_main", "run_compare"]

_DESCRIPTION = """Evaluates several models on the same test sets with the same protocol and prints one table.

MODEL is one of (optionally prefixed by NAME= to name it in the table, e.g. ours=runs/a/checkpoints/last.ckpt):
  RUN/checkpoints/last.ckpt    an effsr checkpoint; its config is the config.yaml that `effsr fit` wrote into the
                               run folder (beside the checkpoint or up to two folders above it)
  CKPT@CONFIG.yaml             a checkpoint with its experiment config given explicitly
  CONFIG.yaml                  an experiment config as built (untrained, or parameter-free), at --scale
  bicubic                      the MATLAB-bicubic baseline
Names default to the run folder (checkpoints), the file stem (configs) or `bicubic`; two models with one name
are an error.

Per model and test set it reports what `effsr test` computes (its test loop and test_results.json): Y-PSNR, SSIM
(Y) and RGB PSNR by the paper protocol, n_images, MACs for a 1280x720 output as executed (sparse / routed
execution counted as run, per set) and params; plus the latency of the model's inference path
(SRModule.super_resolve) on one random LR image of the 1280x720-output size: median of --latency_repeats runs
after one warm-up, batch 1, on the CPU with the stated number of threads, and on CUDA too when it is available.

Writes OUTPUT_DIR/compare.json, OUTPUT_DIR/pareto.png (PSNR-Y vs GMACs@720p per set, log x, one labelled marker
per model, the Pareto front dashed; matplotlib when installed, else OpenCV) and OUTPUT_DIR/<model>/test_results.json.
With --logger wandb: one W&B run with the table, a scatter per set and the PNG (offline without credentials).

Example:
  effsr compare bicubic ours=runs/edsr/checkpoints/last.ckpt runs/carn/checkpoints/last.ckpt \\
      --scale 2 --test_sets '[/data/Set5, /data/Set14]' --output_dir runs/compare_x2
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``effsr compare`` (its ``--help`` documents the whole command)."""
    parser = argparse.ArgumentParser(prog="effsr compare", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="[NAME=]MODEL", help="models to compare (see above)")
    parser.add_argument("--scale", type=int, required=True, help="upscaling factor; every model must be ×scale")
    parser.add_argument("--test_sets", nargs="+", required=True, metavar="SETS",
                        help="test sets: a YAML list '[DIR, ...]' and/or separate entries; an entry is an HR "
                             "folder (set name = folder name), HR_DIR:LR_DIR, `sample` or `div2k_valid`")
    parser.add_argument("--output_dir", default="runs/compare", help="where results, JSON and PNG go")
    parser.add_argument("--latency_repeats", type=int, default=5, help="timed runs per device (median reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the test loops and latency runs (default: OMP_NUM_THREADS when set, "
                             "else torch's default)")
    parser.add_argument("--no_cuda_latency", action="store_true", help="skip the CUDA latency even on a GPU")
    parser.add_argument("--accelerator", default=None,
                        help="accelerator of the test loop (default: each model config's trainer.accelerator)")
    parser.add_argument("--logger", choices=["none", "wandb"], default="none",
                        help="wandb: also log the comparison as one W&B run (offline without credentials)")
    parser.add_argument("--wandb_project", default="effsr-compare", help="W&B project of that run")
    parser.add_argument("--title", default=None, help="plot / W&B run title (default: compare_x<scale>)")
    parser.add_argument("--plot_backend", choices=["auto", "matplotlib", "cv2"], default="auto",
                        help="auto: matplotlib when importable, else OpenCV")
    return parser


def _test_sets(values: list[str]) -> list[str]:
    sets: list[str] = []
    for value in values:
        parsed = yaml.safe_load(value) if value.strip().startswith("[") else value
        sets.extend(str(item) for item in (parsed if isinstance(parsed, list) else [parsed]))
    if not sets:
        raise ConfigError("--test_sets is empty: give at least one HR folder, e.g. --test_sets '[/data/Set5]'.")
    return sets


def run_compare(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Evaluates, times and reports every model of ``args``; returns the ``compare.json`` content."""
    specs = parse_models(args.models)
    test_sets = _test_sets(args.test_sets)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads, _ = apply_thread_count(args.threads)  # the one `[effsr] N CPU threads` line of the command
    cuda = torch.cuda.is_available() and not args.no_cuda_latency
    models = []
    for spec in specs:
        results, module = evaluate_model(spec, args.scale, test_sets, output_dir, args.accelerator, threads)
        latency_cpu = measure_latency_ms(module, args.scale, args.latency_repeats, "cpu")
        latency_cuda = measure_latency_ms(module, args.scale, args.latency_repeats, "cuda") if cuda else None
        results_path = output_dir / safe_name(spec.name) / "test_results.json"
        models.append(model_entry(spec, results, results_path, latency_cpu, latency_cuda))
        del module
    lr_size = lr_size_for_720p(args.scale)
    title = args.title or f"compare_x{args.scale}"
    report: dict[str, Any] = {
        "command": command, "scale": args.scale, "test_sets": test_sets,
        "latency": {"repeats": args.latency_repeats, "warmup": 1, "torch_threads": threads, "cpu": cpu_model(),
                    "cuda": torch.cuda.get_device_name() if cuda else None, "lr_size": list(lr_size),
                    "hr_size": [lr_size[0] * args.scale, lr_size[1] * args.scale],
                    "path": "SRModule.super_resolve, batch 1, torch.inference_mode, median"},
        "models": models,
    }
    panels: dict[str, list[tuple[str, float, float]]] = {}
    for model in models:
        for set_name, row in model["sets"].items():
            panels.setdefault(set_name, []).append((model["name"], (row["macs_720p"] or 0.0) / 1e9, row["psnr_y"]))
    png = output_dir / "pareto.png"
    report["plot"] = str(png)
    report["plot_backend"] = pareto_plot(panels, png, f"{title}: PSNR-Y vs GMACs@720p", args.plot_backend)
    report["wandb_run"] = None
    if args.logger == "wandb":
        report["wandb_run"] = str(log_wandb(report, png, output_dir, args.wandb_project, title))
    (output_dir / "compare.json").write_text(json.dumps(report, indent=2))
    print(format_table(models, threads))
    print(f"compare.json and pareto.png written to {output_dir}"
          + (f"; W&B run {report['wandb_run']}" if report["wandb_run"] else ""), flush=True)
    return report


def compare_main(argv: list[str]) -> int:
    """``effsr compare`` (see ``--help``)."""
    args = build_parser().parse_args(argv)
    run_compare(args, "effsr compare " + shlex.join(argv))
    return 0
