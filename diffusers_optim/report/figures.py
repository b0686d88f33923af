"""Report figures as PNG files, drawn with matplotlib's object API (`Figure`), never global pyplot state."""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from diffusers_optim.report.reading import Run, is_number, series
from diffusers_optim.report.stats import higher_is_better
from diffusers_optim.report.style import ArmStyle, arm_style, arm_styles, sig, text_color_on

DPI = 90


def new_figure(width: float, height: float):
    """A Figure not registered with pyplot: no backend selection, no global state, freed with its last reference."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def label_width(names: list[str]) -> float:
    """Inches the longest tick label needs at matplotlib's default font size."""
    return 0.075 * max(map(len, names), default=0)


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
        groups.setdefault(run.arm or run.optimizer, []).append(run)
    return groups


def plot_curves(runs: list[Run], keys: list[str], path: Path, ylabel: str, log_y: bool = True,
                styles: dict[str, ArmStyle] | None = None) -> Path:
    """One panel per key, one line per arm (mean over seeds) with a min-max band; one legend below the panels.

    Each arm has its own colour, dashes and markers (style.py), so an arm whose curve lies exactly on another's
    still shows; the legend sits outside the axes, where it cannot cover data.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups = group_runs(runs)
    styles = styles or arm_styles(list(groups))
    order = {name: i for i, name in enumerate(styles)}
    groups = dict(sorted(groups.items(), key=lambda item: order.get(item[0], len(order))))  # legend: rank order
    cols = min(len(keys), 3) or 1
    rows = max(1, math.ceil(len(keys) / cols))
    fig = new_figure(4.2 * cols, 3.2 * rows + 0.35 * math.ceil(len(groups) / 4) + 0.3)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (name, group) in enumerate(groups.items()):
            style = styles.get(name) or arm_style(i)
            steps, mean, lo, hi = aggregate(group, key)
            # an arm with no data still gets a legend entry, so it is not silently missing
            ax.plot(steps, mean, label=name if steps else f"{name} (no data)",
                    **style.line_kwargs(list(styles).index(name) if name in styles else i, len(steps)))
            if len(group) > 1 and steps:
                ax.fill_between(steps, lo, hi, color=style.color, alpha=0.15, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and has_positive(ax):
            ax.set_yscale("log", nonpositive="mask")  # lr decays to 0 at the end
            plain = FuncFormatter(lambda y, _: sig(y, 3, strip=True))  # 0.72, not 7.2x10^-1
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            # within one decade only minor ticks carry labels; over several they would overlap
            ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4) or 1, frameon=False,
               handlelength=4)
    return save(fig, path)


def has_positive(ax) -> bool:
    """Whether a log axis would show anything (else matplotlib warns "Data has no positive values")."""
    import numpy as np

    return any(np.any(np.isfinite(y) & (y > 0)) for y in (np.asarray(line.get_ydata(), float) for line in ax.lines))


def plot_heatmap(summary: dict[str, Any], keys: list[str], path: Path) -> Path:
    """Final validation loss (mean over seeds) by arm and timestep bucket, values annotated.

    Colour is the loss relative to the best arm in the same bucket: bucket losses differ by orders of
    magnitude (heavy noise vs fine detail), so absolute colour would only show the buckets, not the arms.
    """
    import numpy as np

    names = [row["arm"] for row in summary["arms"]]
    grid = np.array(
        [[row.get(k) if is_number(row.get(k)) else np.nan for k in keys] for row in summary["arms"]],
        dtype=float,
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket where every run failed stays NaN
        relative = grid / np.nanmin(np.where(np.isfinite(grid), grid, np.nan), axis=0, keepdims=True)
    fig = new_figure(1.6 * len(keys) + label_width(names) + 1.5, 0.6 * len(names) + 1.6)
    ax = fig.subplots()
    image = ax.imshow(relative, cmap="viridis", aspect="auto")  # viridis: perceptually uniform, colour-blind safe
    ax.set_xticks(range(len(keys)), [k.split("/", 1)[1] for k in keys])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("timestep bucket")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "failed" if not math.isfinite(grid[i, j]) else sig(grid[i, j])
            # the text colour is chosen against the cell's own colour, not against a global threshold
            cell = image.cmap(image.norm(relative[i, j])) if math.isfinite(relative[i, j]) else (1, 1, 1, 1)
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color=text_color_on(cell))
    fig.colorbar(image, ax=ax, label="final val loss / best in bucket")
    return save(fig, path)


def plot_forest(
    summary: dict[str, Any], keys: list[str], path: Path, floors: dict[str, float | None] | None = None
) -> Path:
    """Per metric, each arm's mean with its 95% interval (bar) and its seeds (dots), best arm first; then the
    paired difference of the ranking metric from the best arm, whose interval decides "tied" (hollow marker).
    """
    arms = summary["arms"]
    names = [row["arm"] for row in arms]
    fig = new_figure(4.2 * (len(keys) + 1) + label_width(names), 0.45 * len(arms) + 1.5)
    axes = fig.subplots(1, len(keys) + 1, squeeze=False, sharey=True)[0]
    for ax, key in zip(axes, keys):
        for y, row in enumerate(arms):
            seeds = [r[key] for r in summary["runs"] if r["arm"] == row["arm"] and is_number(r.get(key))]
            ax.plot(seeds, [y] * len(seeds), "o", color="0.6", markersize=3, zorder=1)
            draw_interval(ax, y, row.get(key), row.get(key + "_ci_low"), row.get(key + "_ci_high"), False)
        if is_number(arms[0].get(key)):
            ax.axvline(arms[0][key], color="0.3", linestyle="--", linewidth=0.8)
        floor = (floors or {}).get(key)
        if is_number(floor):
            ax.axvline(floor, color="C2", linestyle=":", linewidth=1.5, label="floor (real vs real)")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{key} ({'higher' if higher_is_better(key) else 'lower'} is better)")
        ax.set_xlabel("mean and 95% interval over seeds")
    ax = axes[-1]
    metric = summary["rank_by"]
    for y, row in enumerate(arms):
        diff = row.get("diff_vs_best") or {}
        mean = 0.0 if row.get("best") else diff.get("mean")
        draw_interval(ax, y, mean, diff.get("low"), diff.get("high"), bool(row.get("tied")))
    ax.axvline(0.0, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_title(f"{metric}: arm - best, paired by seed")
    ax.set_xlabel("difference and 95% interval (hollow: tied)")
    axes[0].set_yticks(range(len(arms)), names)
    axes[0].invert_yaxis()  # rank 1 at the top (the axes share y)
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    return save(fig, path)


def draw_interval(ax, y: float, mean: Any, low: Any, high: Any, hollow: bool) -> None:
    """A diamond at the mean and a bar over the interval; "no data" when there is no mean."""
    if not is_number(mean):
        ax.text(0.02, y, "no data", va="center", transform=ax.get_yaxis_transform(), color="C3")
        return
    if is_number(low) and is_number(high):
        ax.hlines(y, low, high, color="C0", linewidth=2, zorder=2)
    ax.plot([mean], [y], "D", color="C0", markerfacecolor="white" if hollow else "C0", zorder=3)
