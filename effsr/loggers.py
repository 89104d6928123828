"""Everything logger-specific (W&B, TensorBoard) in one place; the only effsr module that imports ``wandb``.

Methods and commands describe *what* to log (an image, histograms, a per-layer bar chart, a comparison table);
the functions here turn it into each attached logger's own objects and ignore loggers that cannot show it.
W&B's offline fallback (no credentials or no server → offline run, ``wandb sync`` later) lives here too.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

__all__ = [
    "GroupScatter",
    "ensure_wandb_mode",
    "finish_wandb_runs",
    "log_bar_chart",
    "log_histograms",
    "log_config",
    "log_image",
    "log_wandb_table_run",
    "prepare_loggers",
    "prepare_wandb_logger",
]


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_wandb_mode() -> str | None:
    """Switches W&B to offline mode when there are no credentials or no server; returns the reason.

    A run never crashes or prompts for lack of credentials: it is written offline and can be uploaded
    later with ``wandb sync <run dir>``.
    """
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return None
    reason = None
    if not _has_wandb_credentials():
        reason = "no W&B credentials (set WANDB_API_KEY or run `wandb login`)"
    elif not _wandb_reachable():
        reason = "the W&B server is not reachable"
    if reason:
        os.environ["WANDB_MODE"] = "offline"
        print(f"[effsr] W&B runs offline: {reason}. Upload later with `wandb sync <run dir>`.", file=sys.stderr)
    return reason


def prepare_wandb_logger(logger: WandbLogger) -> None:
    """Readies a WandbLogger before its run starts.

    Lightning always passes ``anonymous=None`` to ``wandb.init``, which wandb (0.31 here) reports as a setting that
    "has no effect"; the key is dropped unless the user set it. The save dir is made absolute (against this
    process's cwd) because wandb-core, a separate process that may have been started from another folder,
    resolves a relative ``dir`` in its own cwd (runs landed in the repository's ``runs/``), and it is created so
    that wandb finds the git repository of the run there (and records its commit) instead of warning that the
    folder does not exist.
    """
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and "anonymous" in init_kwargs and init_kwargs["anonymous"] is None:
        del init_kwargs["anonymous"]
    if logger.save_dir:
        save_dir = str(Path(logger.save_dir).absolute())
        logger._save_dir = save_dir  # Lightning keeps save_dir twice: its property and the wandb.init kwargs
        if isinstance(init_kwargs, dict):
            init_kwargs["dir"] = save_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)


def prepare_loggers(loggers: Iterable[Logger]) -> None:
    """Readies the trainer's loggers before their runs start (W&B: :func:`prepare_wandb_logger`)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            prepare_wandb_logger(logger)


def finish_wandb_runs() -> None:
    """Closes the W&B run a command opened, so its summary is written and the next command starts a new run."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def log_config(loggers: Iterable[Logger], config_text: str) -> None:
    """Attaches the resolved config (YAML text) to every logger's run as ``effsr_config``; W&B also gets it as
    the file ``effsr_config.yaml`` of the run."""
    for logger in loggers:
        logger.log_hyperparams({"effsr_config": yaml.safe_load(config_text)})
        if isinstance(logger, WandbLogger):
            (Path(logger.experiment.dir) / "effsr_config.yaml").write_text(config_text)


def log_image(logger: Any, key: str, image: np.ndarray, caption: str, step: int) -> None:
    """Logs an HxWx3 uint8 image to W&B or TensorBoard; other loggers are ignored."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], caption=[caption], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


def log_histograms(loggers: Iterable[Logger], values: Mapping[str, Tensor], step: int) -> None:
    """Histograms of 1-D CPU tensors (``{key: values}``) to W&B and TensorBoard; other loggers are ignored."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({**{key: wandb.Histogram(value.numpy()) for key, value in values.items()},
                                   "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            for key, value in values.items():
                logger.experiment.add_histogram(key, value, global_step=step)


def log_bar_chart(loggers: Iterable[Logger], key: str, bars: Mapping[str, float], columns: tuple[str, str],
                  title: str, step: int) -> None:
    """A bar chart (one bar per entry of ``bars``, e.g. per-layer widths) as a W&B plot; other loggers are
    ignored (log their summary scalars with ``log_metrics``)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            table = wandb.Table(data=[[name, value] for name, value in bars.items()], columns=list(columns))
            logger.experiment.log({key: wandb.plot.bar(table, columns[0], columns[1], title=title),
                                   "trainer/global_step": step})


@dataclass(frozen=True)
class GroupScatter:
    """One scatter of ``y`` against ``x`` per distinct value of column ``group``; ``key``/``title`` are
    format strings with ``{group}``."""

    x: str
    y: str
    group: str
    key: str
    title: str


def log_wandb_table_run(*, project: str, run_name: str, output_dir: Path, job_type: str, config: dict[str, Any],
                        prefix: str, columns: list[str], rows: list[list[Any]], image: Path,
                        scatter: GroupScatter | None = None, summary: Mapping[str, float] | None = None) -> Path:
    """One W&B run (offline without credentials/server): the table ``<prefix>/table``, the image
    ``<prefix>/pareto``, optionally one scatter per group of rows (:class:`GroupScatter`) and summary values;
    returns the run's folder."""
    import wandb

    ensure_wandb_mode()
    output_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=run_name, dir=str(output_dir), job_type=job_type, config=config)
    try:
        logged: dict[str, Any] = {f"{prefix}/table": wandb.Table(columns=columns, data=rows),
                                  f"{prefix}/pareto": wandb.Image(str(image))}
        if scatter is not None:
            index = columns.index(scatter.group)
            for group in dict.fromkeys(row[index] for row in rows):
                subset = wandb.Table(columns=columns, data=[row for row in rows if row[index] == group])
                logged[scatter.key.format(group=group)] = wandb.plot.scatter(
                    subset, scatter.x, scatter.y, title=scatter.title.format(group=group))
        run.log(logged)
        for key, value in (summary or {}).items():
            run.summary[key] = value
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
