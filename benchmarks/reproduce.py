"""Reproduction harness: train an experiment's models through the real CLI, compare them, record the result.

    python benchmarks/reproduce.py                       # lists the experiments
    python benchmarks/reproduce.py EXPERIMENT [--train DIR ...] [--test DIR ...] [--seeds K] [--work-dir W]

An experiment (``benchmarks/_reproduce_experiments.py``) is a declared list of models: the method and its
baselines, each trained by a sequence of ``effsr fit`` subprocesses or evaluated as it is (``bicubic``). All of
them are then evaluated together by ``effsr compare`` on the test sets. Every fit stage runs in
``W/runs/<model>/<seed>-<key>/stage<i>`` and is cached: the key hashes the stage configs' text, the overrides,
the seed and the training data (paths and file listing); a ``finished.json`` marker is written after the final
checkpoint exists, so a rerun only evaluates (an interrupted stage resumes from its last checkpoint).
``--seeds K`` trains seeded models with seeds 0..K-1 and reports mean and sd over them.

Writes ``W/EXPERIMENT.json`` and ``W/EXPERIMENT/compare/`` (compare.json, pareto.png), prints the table and
updates the experiment's section of docs/reproduction.md (``--docs``; ``--no-docs`` to skip). Defaults work on a
fresh clone: ``--train sample`` (the embedded sample photographs) and ``--test sample`` (its held-out images).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _reproduce_experiments import EXPERIMENTS, Experiment, ExtraContext, ModelDecl  # noqa: E402
from _reproduce_report import (  # noqa: E402
    aggregate,
    claim_checks,
    format_markdown_table,
    reading,
    seed_checks,
    update_docs,
)

from effsr.cli_support import config_chain  # noqa: E402


def _effsr(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "effsr.cli", *arguments]


def _data_arg(entries: list[str]) -> str:
    return entries[0] if len(entries) == 1 else json.dumps(entries)


def data_fingerprint(entries: list[str]) -> list[Any]:
    """What identifies training data in the cache key: a folder's absolute path and (name, size) listing, or
    the name of a named set (``sample``, ``div2k``...)."""
    prints: list[Any] = []
    for entry in entries:
        folder = Path(entry.split(":")[0]).expanduser()
        if folder.is_dir():
            files = sorted((str(path.relative_to(folder)), path.stat().st_size)
                           for path in folder.rglob("*") if path.is_file())
            prints.append([str(folder.resolve()), files])
        else:
            prints.append(entry)
    return prints


def _config_text(config: str) -> str:
    """The text a stage's config trains with: the file itself, preceded by its ``base:`` recipes when it has any
    (so an edit to a recipe invalidates the runs built on it; a config without a base hashes as before)."""
    return "".join(path.read_text() for path in config_chain(REPO / config))


def cache_key(decl: ModelDecl, seed: int | None, train: list[str]) -> str:
    """Hash of what determines a model's weights: stage configs (text) and overrides, seed, training data."""
    stages = [{"config": stage.config, "text": _config_text(stage.config), "overrides": list(stage.overrides)}
              for stage in decl.stages]
    content = json.dumps({"stages": stages, "seed": seed, "train": data_fingerprint(train)}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _run_logged(command: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as stream:
        returncode = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"command failed ({returncode}): {shlex.join(command)}\n--- {log} (tail) ---\n{tail}")
    return time.perf_counter() - start


def train_model(decl: ModelDecl, seed: int | None, train: list[str], work: Path) -> tuple[Path, float, bool]:
    """Runs (or reuses) the fit stages of ``decl``; returns (final checkpoint, recorded seconds, trained now)."""
    key = cache_key(decl, seed, train)
    run_dir = work / "runs" / decl.name / f"{'unseeded' if seed is None else f'seed{seed}'}-{key[:12]}"
    previous: Path | None = None
    seconds, trained = 0.0, False
    for index, stage in enumerate(decl.stages):
        stage_dir = run_dir / f"stage{index}"
        if stage.shared:  # one run for every model/seed with these leading stages (no seed)
            prefix = dataclasses.replace(decl, stages=decl.stages[:index + 1], compare_as=None)
            stage_dir = work / "shared" / cache_key(prefix, None, train)[:12] / f"stage{index}"
        marker = stage_dir / "finished.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            previous, seconds = Path(record["checkpoint"]), seconds + record["seconds"]
            print(f"  {decl.name} seed={seed} stage {index}: cached ({stage_dir})", flush=True)
            continue
        overrides = [override.format(prev=previous) for override in stage.overrides]
        command = _effsr("fit", "--config", str(REPO / stage.config), *overrides, f"--data.train={_data_arg(train)}",
                         f"--trainer.default_root_dir={stage_dir}", "--trainer.logger=false",
                         "--trainer.limit_val_batches=0")
        if seed is not None and not stage.shared:
            command += [f"--seed_everything={seed}", f"--data.seed={seed}"]
        last = stage_dir / "checkpoints" / "last.ckpt"
        if last.is_file() and not any(item.startswith("--ckpt_path") for item in overrides):
            command.append("--ckpt_path=last")  # an interrupted stage resumes from its last epoch boundary
        print(f"  {decl.name} seed={seed} stage {index}: training ({stage_dir / 'fit.log'})", flush=True)
        elapsed = _run_logged(command, stage_dir / "fit.log")
        if not last.is_file():
            raise SystemExit(f"{shlex.join(command)} finished without writing {last}")
        marker.write_text(json.dumps({"checkpoint": str(last), "seconds": elapsed, "command": command, "key": key}))
        previous, seconds, trained = last, seconds + elapsed, True
    assert previous is not None  # ModelDecl guarantees stages here
    return previous, seconds, trained


def _describe_data(entries: list[str], default: str) -> str:
    if entries == ["sample"]:
        return f"the embedded sample set ({default})"
    return ", ".join(f"`{entry}`" for entry in entries)


def run_experiment(experiment: Experiment, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Trains (or reuses) every model, runs ``effsr compare``, writes the JSON and the docs section."""
    start = time.perf_counter()
    work = Path(args.work_dir).resolve()
    compare_dir = work / experiment.name / "compare"
    print(f"[reproduce] {experiment.name}: {experiment.summary}", flush=True)
    trained_models: list[dict[str, Any]] = []
    compare_models: list[str] = []
    for decl in experiment.models:
        for seed in (range(args.seeds) if decl.seeded else [None]):
            label = decl.name if seed is None else f"{decl.name}-s{seed}"
            if decl.stages:
                checkpoint, seconds, trained = train_model(decl, seed, args.train, work)
                compare_models.append(f"{label}={checkpoint}")
            elif decl.from_run:
                source = next(item for item in trained_models
                              if item["decl"].name == decl.from_run[0] and item["seed"] == seed)
                checkpoint, seconds, trained = source["checkpoint"].parent.parent / decl.from_run[1], None, False
                if not checkpoint.is_file():
                    raise SystemExit(f"model {decl.name!r}: {checkpoint} (written by {decl.from_run[0]}) is missing")
                compare_models.append(f"{label}={checkpoint}")
            else:
                target = decl.compare_as or ""
                checkpoint, seconds, trained = None, None, False
                compare_models.append(f"{label}={target if target == 'bicubic' else REPO / target}")
            trained_models.append({"decl": decl, "seed": seed, "label": label, "checkpoint": checkpoint,
                                   "seconds": seconds, "trained": trained})
    train_done = time.perf_counter()
    compare_command = _effsr("compare", "--scale", str(experiment.scale), "--test_sets",
                             json.dumps(args.test), "--output_dir", str(compare_dir), "--latency_repeats",
                             str(args.latency_repeats), "--title", experiment.name,
                             *(["--logger", "wandb"] if args.wandb else []),
                             "--", *compare_models)  # `--`: a model named like an option (-O) stays a model
    if args.reuse_evaluation and _evaluated_sources(compare_dir, args.test) >= set(compare_models):
        print(f"  --reuse-evaluation: {compare_dir / 'compare.json'} holds every model; not evaluated again",
              flush=True)
    else:
        print(f"  evaluating {len(compare_models)} models with effsr compare ({compare_dir / 'compare.log'})",
              flush=True)
        _run_logged(compare_command, compare_dir / "compare.log")
    report_json = json.loads((compare_dir / "compare.json").read_text())
    compared = {entry["name"]: entry for entry in report_json["models"]}
    models = []
    for item in trained_models:
        entry, decl = compared[item["label"]], item["decl"]
        extra = decl.extra(ExtraContext(item["checkpoint"], entry, item["seconds"])) if decl.extra else {}
        models.append({
            "name": decl.name, "role": decl.role, "seed": item["seed"], "macs_720p": entry["macs_720p"],
            "params": entry["params"], "latency_ms_720p": entry["latency_ms_720p"],
            "sets": {set_name: {key: row.get(key) for key in ("psnr_y", "ssim_y", "n_images", "macs_720p")}
                     for set_name, row in entry["sets"].items()},
            "extra": extra, "checkpoint": str(item["checkpoint"]) if item["checkpoint"] else None,
        })
    summary = aggregate(models)
    sentences = [*reading(experiment.claim, summary), *seed_checks(experiment.claim, models),
                 *claim_checks(experiment.claim, experiment.bound, models)]
    end = time.perf_counter()
    result = {
        "experiment": experiment.name, "command": command, "train": args.train, "test": args.test,
        "seeds": args.seeds, "scale": experiment.scale, "models": models, "summary": summary, "reading": sentences,
        "cpu": report_json["latency"]["cpu"], "torch_threads": report_json["latency"]["torch_threads"],
        "time": {"train_seconds_recorded": sum(item["seconds"] or 0.0 for item in trained_models),
                 "trained_this_run": [item["label"] for item in trained_models if item["trained"]],
                 "train_phase_seconds_this_run": train_done - start, "evaluate_seconds": end - train_done,
                 "total_seconds_this_run": end - start},
        "compare_json": str(compare_dir / "compare.json"), "plot": str(compare_dir / "pareto.png"),
    }
    (work / f"{experiment.name}.json").write_text(json.dumps(result, indent=2))
    print(format_markdown_table(summary))
    print("\n".join(sentences))
    print(f"[reproduce] wrote {work / f'{experiment.name}.json'}; trained this run: "
          f"{result['time']['trained_this_run'] or 'nothing (all cached)'}", flush=True)
    if not args.no_docs:
        _write_docs(experiment, result, summary, Path(args.docs))
    return result


def _evaluated_sources(compare_dir: Path, test: list[str]) -> set[str]:
    """The ``label=checkpoint`` models an earlier ``effsr compare`` of this experiment evaluated (its compare.json),
    if it ran on the same test sets (else none): a retrained model has another checkpoint path, so it is not reused."""
    path = compare_dir / "compare.json"
    if not path.is_file():
        return set()
    report = json.loads(path.read_text())
    return {entry["source"] for entry in report["models"]} if report.get("test_sets") == list(test) else set()


def _write_docs(experiment: Experiment, result: dict[str, Any], summary: dict[str, Any], docs: Path) -> None:
    png = docs.parent / "reproduction" / f"{experiment.name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result["plot"], png)
    timing = result["time"]
    section = "\n".join([
        f"## {experiment.name}", "", experiment.summary, "",
        f"- Command: `{result['command']}`; this invocation "
        + (f"trained {', '.join(timing['trained_this_run'])}" if timing["trained_this_run"]
           else "trained nothing (every run cached) and only evaluated"),
        f"- Data: train {_describe_data(result['train'], '12 training photographs')}; test "
        f"{_describe_data(result['test'], '3 held-out photographs')}; ×{experiment.scale}, LR by MATLAB bicubic",
        f"- Time: training {timing['train_seconds_recorded'] / 60:.1f} min (recorded by the runs), evaluation "
        f"{timing['evaluate_seconds'] / 60:.1f} min; CPU: {result['cpu']}, {result['torch_threads']} torch threads "
        "(latency: median of `effsr compare` runs on a 1280×720 output)",
        f"- Seeds: {result['seeds']} (seeded models); JSON: `{experiment.name}.json` in the work dir", "",
        format_markdown_table(summary), "",
        f"![PSNR-Y vs GMACs@720p]({png.relative_to(docs.parent).as_posix()})", "",
        "**Reading.** " + " ".join(result["reading"]),
    ])
    update_docs(docs, experiment.name, section)
    print(f"[reproduce] updated {docs} (section {experiment.name}) and {png}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/reproduce.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", help="experiment name (none: list them)")
    parser.add_argument("--train", nargs="+", default=["sample"], help="training HR folder(s) or named set")
    parser.add_argument("--test", nargs="+", default=["sample"], help="test HR folders (set name = folder name)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per seeded model (mean and sd reported)")
    parser.add_argument("--work-dir", dest="work_dir", default="runs/reproduce", help="runs, caches and JSON")
    parser.add_argument("--latency-repeats", dest="latency_repeats", type=int, default=5)
    parser.add_argument("--docs", default=str(REPO / "docs" / "reproduction.md"), help="Markdown file to update")
    parser.add_argument("--no-docs", dest="no_docs", action="store_true", help="do not touch the docs")
    parser.add_argument("--wandb", action="store_true", help="log the comparison as a W&B run (offline fallback)")
    parser.add_argument("--reuse-evaluation", dest="reuse_evaluation", action="store_true",
                        help="when the last evaluation (W/EXPERIMENT/compare/compare.json) holds every model, "
                             "rebuild the JSON, table and docs from it instead of evaluating again")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.experiment:
        for experiment in EXPERIMENTS.values():
            note = "  (harness self-test)" if experiment.test_only else ""
            print(f"{experiment.name:<18} ×{experiment.scale}  {experiment.summary}{note}")
        return 0
    if args.experiment not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {args.experiment!r}; known: {', '.join(EXPERIMENTS)}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    run_experiment(EXPERIMENTS[args.experiment], args, "python benchmarks/reproduce.py " + shlex.join(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
