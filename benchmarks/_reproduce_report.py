"""Summaries of ``benchmarks/reproduce.py``: mean and spread over seeds, the table, the plain reading and the
experiment's section of docs/reproduction.md (between ``<!-- reproduce:NAME begin/end -->`` markers)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def aggregate(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model name: role, number of seeds, cost and per-set PSNR-Y/SSIM-Y mean and sd over the seeds."""
    summary: dict[str, dict[str, Any]] = {}
    for entry in models:
        summary.setdefault(entry["name"], {"role": entry["role"], "entries": []})["entries"].append(entry)
    for row in summary.values():
        entries = row.pop("entries")
        row["n_seeds"] = len(entries)
        for key in ("macs_720p", "params", "latency_ms_720p"):
            row[key] = statistics.mean(entry[key] for entry in entries)
        row["sets"] = {}
        for set_name in entries[0]["sets"]:
            psnr = [entry["sets"][set_name]["psnr_y"] for entry in entries]
            ssim = [entry["sets"][set_name]["ssim_y"] for entry in entries]
            macs = [entry["sets"][set_name].get("macs_720p") for entry in entries]
            row["sets"][set_name] = {"n_images": entries[0]["sets"][set_name]["n_images"],
                                     "psnr_y_mean": statistics.mean(psnr), "psnr_y_sd": _sd(psnr),
                                     "ssim_y_mean": statistics.mean(ssim), "ssim_y_sd": _sd(ssim),
                                     "macs_720p": statistics.mean(macs) if None not in macs else None}
    return summary


def _pm(mean: float, sd: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def format_markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± sd over seeds; no ± with one seed). GMACs are each set's own (the
    mean over that set's images for data-dependent methods: SMSR, ClassSR), else the model's."""
    lines = ["| model | role | seeds | set | n | PSNR-Y [dB] | SSIM-Y | GMACs@720p | params | CPU ms@720p |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        for set_name, values in row["sets"].items():
            macs = values.get("macs_720p") if values.get("macs_720p") is not None else row["macs_720p"]
            lines.append(
                f"| {name} | {row['role']} | {row['n_seeds']} | {set_name} | {values['n_images']} | "
                f"{_pm(values['psnr_y_mean'], values['psnr_y_sd'], 2)} | "
                f"{_pm(values['ssim_y_mean'], values['ssim_y_sd'], 4)} | {macs / 1e9:.3f} | "
                f"{row['params'] / 1e3:.1f}K | {row['latency_ms_720p']:.0f} |")
    return "\n".join(lines)


def reading(claim: tuple[str, str], summary: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences: the method's PSNR-Y gap to the baseline per set, and whether it exceeds the spread.

    An effect counts as shown when the gap exceeds twice the combined seed sd (sqrt(sd_m² + sd_b²)); with a
    single seed per model the spread is not measured and the sentence says so.
    """
    method, baseline = claim
    sentences = []
    for set_name, values in summary[method]["sets"].items():
        other = summary[baseline]["sets"][set_name]
        gap = values["psnr_y_mean"] - other["psnr_y_mean"]
        sds = [sd for sd in (values["psnr_y_sd"], other["psnr_y_sd"]) if sd is not None]
        spread = math.sqrt(sum(sd * sd for sd in sds)) if sds else None
        direction = "above" if gap > 0 else "below"
        text = (f"{set_name} ({values['n_images']} images): {method} is {abs(gap):.2f} dB PSNR-Y {direction} "
                f"{baseline} (mean of {summary[method]['n_seeds']} seed(s))")
        if spread is None:
            text += "; one seed per model, so the spread is not measured: rerun with --seeds 3 to measure it."
        elif abs(gap) > 2 * spread:
            text += f"; the gap is {abs(gap) / spread:.1f}× the seed spread ({spread:.3f} dB sd): effect shown."
        else:
            text += f"; within twice the seed spread ({spread:.3f} dB sd): effect not shown."
        sentences.append(text)
    return sentences


# a seed counts as an outlier when it sits this far from its other seeds' mean: more than OUTLIER_SDS of their sd
# and more than OUTLIER_MIN_DB (a 0.02 dB sd among three seeds must not flag a 0.05 dB seed)
OUTLIER_SDS = 4.0
OUTLIER_MIN_DB = 0.1


def _by_seed(models: list[dict[str, Any]], name: str, set_name: str) -> dict[int, float]:
    return {entry["seed"]: entry["sets"][set_name]["psnr_y"] for entry in models
            if entry["name"] == name and entry["seed"] is not None and set_name in entry["sets"]}


def seed_checks(claim: tuple[str, str], models: list[dict[str, Any]]) -> list[str]:
    """Per-seed sentences the means hide: the method − baseline gap of each seed against the same seed of the
    baseline (when both are seeded), and any seed of either model that is an outlier among its own seeds (e.g. an
    undertrained baseline seed, which makes the method look better on the mean)."""
    sentences = []
    sets = next((list(entry["sets"]) for entry in models if entry["name"] == claim[0]), [])
    for set_name in sets:
        method, baseline = (_by_seed(models, name, set_name) for name in claim)
        paired = sorted(set(method) & set(baseline))
        if len(paired) >= 2:
            gaps = ", ".join(f"s{seed} {method[seed] - baseline[seed]:+.3f}" for seed in paired)
            sentences.append(f"{set_name}: {claim[0]} − {claim[1]} per seed (same seed of both) {gaps} dB.")
        for name, values in zip(claim, (method, baseline), strict=True):
            if len(values) < 3:
                continue
            for seed, value in values.items():
                others = [other for key, other in values.items() if key != seed]
                centre, spread = statistics.mean(others), statistics.stdev(others)
                if abs(value - centre) > max(OUTLIER_SDS * spread, OUTLIER_MIN_DB):
                    sentences.append(
                        f"{set_name}: {name} seed {seed} is {abs(value - centre):.2f} dB "
                        f"{'below' if value < centre else 'above'} its other seeds' mean ({centre:.2f} dB): check "
                        f"that run before reading the means (an undertrained seed moves the mean and the spread).")
    return sentences


def _point(entry: dict[str, Any], set_name: str) -> tuple[float, float]:
    """(PSNR-Y, MACs@720p) of one model entry on one set (the set's own MACs when measured per set)."""
    row = entry["sets"][set_name]
    return float(row["psnr_y"]), float(entry["macs_720p"] if row.get("macs_720p") is None else row["macs_720p"])


def claim_checks(claim: tuple[str, str], bound: Any, models: list[dict[str, Any]]) -> list[str]:
    """Per set: whether the seed means and each seed (against the same seed of the baseline, or the unseeded
    baseline) meet ``bound`` (a ClaimBound: PSNR-Y at most ``max_drop_db`` below the baseline, MACs at most
    ``max_macs_ratio`` of it); then what the bound leaves to be read by hand."""
    if bound is None:
        return []
    method, baseline = claim
    limits = f"at most {bound.max_drop_db:g} dB below {baseline}" + (
        f" at ≤ {100 * bound.max_macs_ratio:g} % of its MACs" if bound.max_macs_ratio is not None else "")

    def meets(point: tuple[float, float], other: tuple[float, float]) -> bool:
        gap, ratio = point[0] - other[0], point[1] / other[1]
        return gap >= -bound.max_drop_db and (bound.max_macs_ratio is None or ratio <= bound.max_macs_ratio)

    sentences = []
    sets = next((list(entry["sets"]) for entry in models if entry["name"] == method), [])
    for set_name in sets:
        points = {name: {entry["seed"]: _point(entry, set_name) for entry in models
                         if entry["name"] == name and set_name in entry["sets"]} for name in claim}
        if not points[method] or not points[baseline]:
            continue
        means = {name: (statistics.mean(p[0] for p in values.values()), statistics.mean(p[1] for p in values.values()))
                 for name, values in points.items()}
        gap, ratio = means[method][0] - means[baseline][0], means[method][1] / means[baseline][1]
        text = (f"Claim on {set_name} ({method} {limits}): seed means {gap:+.3f} dB at {100 * ratio:.1f} % of the "
                f"MACs, {'met' if meets(means[method], means[baseline]) else 'not met'}")
        pairs = {seed: (point, points[baseline].get(None, points[baseline].get(seed)))
                 for seed, point in points[method].items() if seed is not None}
        pairs = {seed: pair for seed, pair in sorted(pairs.items()) if pair[1] is not None}
        if len(pairs) >= 2:
            met = [f"s{seed}" for seed, (point, other) in pairs.items() if meets(point, other)]
            text += f"; per seed met by {len(met)} of {len(pairs)}" + (f" ({', '.join(met)})" if met else "")
        sentences.append(text + ".")
    if sentences and bound.unchecked:
        sentences.append(f"Not checked here: {bound.unchecked}.")
    return sentences


def update_docs(docs: Path, name: str, section: str) -> None:
    """Replaces the experiment's section of ``docs`` (between its markers), appending it when absent."""
    begin, end = f"<!-- reproduce:{name} begin -->", f"<!-- reproduce:{name} end -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    text = docs.read_text() if docs.exists() else "# Reproductions\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
