"""The Pareto plot of a comparison: PSNR-Y against GMACs@720p (log x), one panel per test set.

Each model is one labelled marker; the dashed line joins the Pareto-optimal models (no other model is both
cheaper and better). matplotlib draws it when it is installed (it is a dev extra, not a runtime dependency),
otherwise OpenCV, which effsr already depends on, draws the same content.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["Point", "pareto_front", "pareto_plot"]

Point = tuple[str, float, float]  # (model name, GMACs@720p, PSNR-Y)
Backend = Literal["auto", "matplotlib", "cv2"]
_MARKERS = "osD^vP*Xph<>"


def pareto_front(points: list[Point]) -> list[Point]:
    """The Pareto-optimal points, cheapest first: each is better than every cheaper point."""
    front: list[Point] = []
    for point in sorted(points, key=lambda item: (item[1], -item[2])):
        if not front or point[2] > front[-1][2]:
            front.append(point)
    return front


def _positive(gmacs: float) -> float:
    """Log axes cannot show 0 MACs; such a model is drawn at 1e-6 GMACs (1 kMAC)."""
    return gmacs if gmacs > 0 else 1e-6


def pareto_plot(panels: dict[str, list[Point]], path: Path, title: str, backend: Backend = "auto") -> str:
    """Writes the plot PNG to ``path``; returns the backend that drew it (``matplotlib`` or ``cv2``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            matplotlib.use("Agg", force=False)
            _plot_matplotlib(panels, path, title)
            return "matplotlib"
    _plot_cv2(panels, path, title)
    return "cv2"


def _plot_matplotlib(panels: dict[str, list[Point]], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = sorted({name for points in panels.values() for name, _, _ in points})
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for axis, (set_name, points) in zip(axes[0], panels.items(), strict=True):
        for name, gmacs, psnr in points:
            index = names.index(name)
            axis.scatter([_positive(gmacs)], [psnr], marker=_MARKERS[index % len(_MARKERS)], s=50,
                         color=f"C{index % 10}", label=name, zorder=3)
            axis.annotate(name, (_positive(gmacs), psnr), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = pareto_front(points)
        axis.plot([_positive(g) for _, g, _ in front], [p for _, _, p in front], "--", color="0.5", lw=1, zorder=2)
        axis.set_xscale("log")
        gmacs_values = [_positive(g) for _, g, _ in points]
        axis.set_xlim(min(gmacs_values) / 2.5, max(gmacs_values) * 2.5)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("GMACs for a 1280×720 output (log)")
        axis.set_ylabel("PSNR-Y [dB]")
        axis.set_title(set_name)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_cv2(panels: dict[str, list[Point]], path: Path, title: str) -> None:
    import cv2

    width, height, margin = 560, 440, (70, 40, 30, 60)  # left, top, right, bottom
    names = sorted({name for points in panels.values() for name, _, _ in points})
    canvases = [_panel_cv2(set_name, points, names, width, height, margin) for set_name, points in panels.items()]
    image = np.concatenate(canvases, axis=1)
    banner = np.full((36, image.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, title, (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), np.concatenate([banner, image], axis=0)):
        raise OSError(f"OpenCV could not write {path}")


def _panel_cv2(set_name: str, points: list[Point], names: list[str], width: int, height: int,
               margin: tuple[int, int, int, int]) -> np.ndarray:
    import cv2

    left, top, right, bottom = margin
    canvas = np.full((height, width, 3), 255, np.uint8)
    xs = [math.log10(_positive(gmacs)) for _, gmacs, _ in points]
    ys = [psnr for _, _, psnr in points]
    x_low, x_high = math.floor(min(xs)), max(math.ceil(max(xs)), math.floor(min(xs)) + 1)
    y_pad = max(0.1, 0.1 * (max(ys) - min(ys)))
    y_low, y_high = min(ys) - y_pad, max(ys) + y_pad

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        column = left + (x - x_low) / (x_high - x_low) * (width - left - right)
        row = height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom)
        return int(round(column)), int(round(row))

    black, grey = (0, 0, 0), (160, 160, 160)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(canvas, (left, top), (width - right, height - bottom), black, 1)
    for decade in range(x_low, x_high + 1):
        column, _ = to_pixel(decade, y_low)
        cv2.line(canvas, (column, top), (column, height - bottom), (225, 225, 225), 1)
        cv2.putText(canvas, f"1e{decade}", (column - 15, height - bottom + 18), font, 0.4, black, 1, cv2.LINE_AA)
    for tick in np.linspace(y_low, y_high, 5):
        _, row = to_pixel(x_low, tick)
        cv2.putText(canvas, f"{tick:.2f}", (5, row + 4), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "GMACs @1280x720 (log)", (left + 120, height - 15), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, f"{set_name}: PSNR-Y [dB]", (left, top - 12), font, 0.5, black, 1, cv2.LINE_AA)
    front = [to_pixel(math.log10(_positive(g)), p) for _, g, p in pareto_front(points)]
    for start, end in zip(front, front[1:], strict=False):
        cv2.line(canvas, start, end, grey, 1, cv2.LINE_AA)
    palette = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]
    for (name, _, _), x, y in zip(points, xs, ys, strict=True):
        color = palette[names.index(name) % len(palette)]
        center = to_pixel(x, y)
        cv2.drawMarker(canvas, center, color, cv2.MARKER_DIAMOND if names.index(name) % 2 else cv2.MARKER_SQUARE,
                       12, 2)
        cv2.putText(canvas, name, (center[0] + 8, center[1] - 8), font, 0.45, color, 1, cv2.LINE_AA)
    return canvas
