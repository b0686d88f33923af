"""Report figures as PNG files, drawn with matplotlib's object API (`Figure`), never global pyplot state."""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from diffusers_optim.report.reading import Run, is_number, series

DPI = 90


def new_figure(width: float, height: float):
    """A Figure not registered with pyplot: no backend selection, no global state, freed with its last reference."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def aggregate(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step over seeds: (steps, mean, min, max) of a metric, using the runs that logged that step."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in zip(*series(run.records, key)):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    return steps, means, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.optimizer, []).append(run)
    return groups


def plot_curves(runs: list[Run], keys: list[str], path: Path, ylabel: str, log_y: bool = True) -> Path:
    """One panel per key, one line per optimizer (mean over seeds) with a min-max band."""
    cols = min(len(keys), 3) or 1
    rows = max(1, math.ceil(len(keys) / cols))
    fig = new_figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (name, group) in enumerate(group_runs(runs).items()):
            steps, mean, lo, hi = aggregate(group, key)
            color = f"C{i % 10}"
            # an optimizer with no data still gets a legend entry, so it is not silently missing
            ax.plot(steps, mean, color=color, label=name if steps else f"{name} (no data)")
            if len(group) > 1 and steps:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and any(line.get_ydata().size for line in ax.lines):
            ax.set_yscale("log", nonpositive="mask")  # lr decays to 0 at the end
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return save(fig, path)


def plot_heatmap(summary: dict[str, Any], keys: list[str], path: Path) -> Path:
    """Final validation loss (mean over seeds) by optimizer and timestep bucket, values annotated.

    Colour is the loss relative to the best optimizer in the same bucket: bucket losses differ by orders of
    magnitude (heavy noise vs fine detail), so absolute colour would only show the buckets, not the optimizers.
    """
    import numpy as np

    names = [row["optimizer"] for row in summary["optimizers"]]
    grid = np.array(
        [[row.get(k) if is_number(row.get(k)) else np.nan for k in keys] for row in summary["optimizers"]],
        dtype=float,
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket where every run failed stays NaN
        relative = grid / np.nanmin(np.where(np.isfinite(grid), grid, np.nan), axis=0, keepdims=True)
    fig = new_figure(1.6 * len(keys) + 2.5, 0.6 * len(names) + 1.6)
    ax = fig.subplots()
    image = ax.imshow(relative, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(keys)), [k.split("/", 1)[1] for k in keys])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("timestep bucket")
    finite = relative[np.isfinite(relative)]
    middle = float(np.median(finite)) if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "failed" if not math.isfinite(grid[i, j]) else f"{grid[i, j]:.4g}"
            dark = math.isfinite(relative[i, j]) and relative[i, j] < middle
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="final val loss / best in bucket")
    return save(fig, path)
