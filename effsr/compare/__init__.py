"""``effsr compare``: several models evaluated with one protocol (effsr's test loop), one table, compare.json,
a Pareto plot and optionally a W&B run. See ``effsr compare --help`` and docs/reproduction.md."""

from effsr.compare.command import build_parser, compare_main, run_compare
from effsr.compare.evaluate import evaluate_model, measure_latency_ms
from effsr.compare.models import ModelSpec, parse_models
from effsr.compare.plot import pareto_front, pareto_plot

__all__ = ["ModelSpec", "build_parser", "compare_main", "evaluate_model", "measure_latency_ms", "pareto_front",
           "pareto_plot", "parse_models", "run_compare"]
