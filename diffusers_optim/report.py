"""Summaries and local reports of a comparison folder: summary.json/csv, report.html, report.md.

`diffusers-optim summarize DIR` rebuilds everything from the run folders alone, so a report can be
regenerated after the fact (or after a run was added by hand). Layout of DIR (written by compare.py):
plan.json, failures.json, runs/<run>/ (one training run each), tuning/<run>/ (the lr-grid trials).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_optim.errors import UserError

logger = logging.getLogger(__name__)

SPIKE_FACTOR = 3.0  # a loss spike: train/loss above this multiple of the running median so far
SPIKE_MIN_HISTORY = 3  # the running median needs a few points before it means anything
TARGET_SLACK = 1.1  # default target: the worst optimizer's best val/loss times this
FIGURES_DIR = "report_files"
BUCKET_RE = re.compile(r"^(?:val_t|loss_t)/(\d+)-(\d+)$")


@dataclass
class Run:
    """One training run of a comparison, as found on disk."""

    name: str
    path: Path
    optimizer: str  # the label the comparison groups by (usually the registry name)
    learning_rate: float | None
    seed: int | None
    status: str  # complete | incomplete | failed | missing
    error: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


# ---- reading run folders -----------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or {} when it is absent or unreadable (a run killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records; a torn last line (killed run) is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable line in %s", path)
    return records


def load_run(path: Path, planned: dict[str, Any] | None = None, error: str | None = None) -> Run:
    """Read one run folder; `planned` (from plan.json) names runs that never produced a folder."""
    planned = planned or {}
    config = read_json(path / "config.json")
    summary = read_json(path / "run_summary.json")
    train_cfg = config.get("config", {})
    optimizer = (
        planned.get("optimizer") or config.get("optimizer", {}).get("name") or train_cfg.get("optimizer")
    )
    if summary.get("status") == "complete":
        status = "complete"
    elif error:
        status = "failed"
    elif path.exists():
        status = "incomplete"
    else:
        status = "missing"
    return Run(
        name=planned.get("name", path.name),
        path=path,
        optimizer=optimizer or path.name,
        learning_rate=planned.get("learning_rate", train_cfg.get("learning_rate")),
        seed=planned.get("seed", train_cfg.get("seed")),
        status=status,
        error=error,
        records=read_metrics(path / "metrics.jsonl"),
        summary=summary,
        config=config,
    )


def load_comparison(root: Path, stage: str = "final") -> list[Run]:
    """The runs of one stage ("final" or "tune") of a comparison folder, in plan order."""
    root = Path(root)
    plan = read_json(root / "plan.json")
    failures = read_json(root / "failures.json")
    planned = [r for r in plan.get("runs", []) if r.get("stage", "final") == stage]
    if planned:
        return [load_run(root / r["path"], r, failures.get(r["name"])) for r in planned]
    folder = root / ("runs" if stage == "final" else "tuning")
    dirs = sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    return [load_run(p, error=failures.get(p.name)) for p in dirs]


# ---- numbers from metrics.jsonl ----------------------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; null (NaN) entries are kept as NaN so divergence shows."""
    steps, values = [], []
    for rec in records:
        if key in rec:
            value = rec[key]
            steps.append(int(rec["step"]))
            values.append(float(value) if is_number(value) else math.nan)
    return steps, values


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    """The last logged value of a metric (NaN if it was non-finite), None if never logged."""
    for rec in reversed(records):
        if key in rec:
            return float(rec[key]) if is_number(rec[key]) else math.nan
    return None


def bucket_keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    """The timestep-bucket keys (`val_t/000-249`, ...) seen in the records, in timestep order."""
    keys = {k for rec in records for k in rec if k.startswith(prefix + "/") and BUCKET_RE.match(k)}
    return sorted(keys, key=lambda k: int(BUCKET_RE.match(k).group(1)))


def count_spikes(losses: list[float], factor: float = SPIKE_FACTOR) -> int:
    """Points where the loss exceeds `factor` x the median of all earlier finite points (or is non-finite)."""
    spikes, history = 0, []
    for loss in losses:
        if not math.isfinite(loss):
            spikes += 1
            continue
        if len(history) >= SPIKE_MIN_HISTORY and loss > factor * statistics.median(history):
            spikes += 1
        history.append(loss)
    return spikes


def time_to_target(records: list[dict[str, Any]], target: float) -> tuple[int, float] | None:
    """(step, elapsed seconds) of the first val/loss at or below target, None when never reached."""
    for rec in records:
        value = rec.get("val/loss")
        if is_number(value) and value <= target:
            return int(rec["step"]), float(rec.get("elapsed_s", math.nan))
    return None


def best_val_loss(run: Run) -> float | None:
    values = [v for v in series(run.records, "val/loss")[1] if math.isfinite(v)]
    return min(values) if values else None


def default_target(runs: list[Run]) -> float | None:
    """The worst optimizer's best val/loss x TARGET_SLACK, so every optimizer that learns reaches it."""
    best: dict[str, float] = {}
    for run in runs:
        value = best_val_loss(run)
        if value is not None:
            best[run.optimizer] = min(value, best.get(run.optimizer, math.inf))
    return max(best.values()) * TARGET_SLACK if best else None


# ---- summary rows --------------------------------------------------------------------------------


def mean_of(records: list[dict[str, Any]], key: str) -> float | None:
    values = [v for v in series(records, key)[1] if math.isfinite(v)]
    return statistics.fmean(values) if values else None


def max_of(records: list[dict[str, Any]], key: str) -> float | None:
    values = [v for v in series(records, key)[1] if math.isfinite(v)]
    return max(values) if values else None


def run_row(run: Run, target: float | None) -> dict[str, Any]:
    """One summary row: final losses per bucket, eval/*, time to target, speed, memory, instability."""
    recs = run.records
    row: dict[str, Any] = dict(
        kind="run",
        optimizer=run.optimizer,
        run=run.name,
        seed=run.seed,
        learning_rate=run.learning_rate,
        status=run.status,
        error=run.error,
    )
    row["steps"] = run.summary.get("steps", recs[-1]["step"] if recs else None)
    row["wall_time_s"] = run.summary.get("wall_time_s", recs[-1].get("elapsed_s") if recs else None)
    for key in ["train/loss", "val/loss", *bucket_keys(recs, "loss_t"), *bucket_keys(recs, "val_t")]:
        row[key] = last_value(recs, key)
    for key in sorted({k for rec in recs for k in rec if k.startswith("eval/")}):
        row[key] = last_value(recs, key)
    hit = time_to_target(recs, target) if target is not None else None
    row["target_step"], row["target_seconds"] = hit if hit else (None, None)
    row["perf/images_per_sec"] = mean_of(recs, "perf/images_per_sec")
    row["perf/peak_memory_mb"] = max_of(recs, "perf/peak_memory_mb")
    row["optim/state_mb"] = max_of(recs, "optim/state_mb")
    nonfinite = run.summary.get("nonfinite_steps", last_value(recs, "train/nonfinite_steps"))
    row["nonfinite_steps"] = int(nonfinite) if is_number(nonfinite) else None
    row["loss_spikes"] = count_spikes(series(recs, "train/loss")[1]) if recs else None
    row["clipped_fraction_mean"] = mean_of(recs, "train/clipped_fraction")
    return row


ID_COLUMNS = ("kind", "optimizer", "run", "seed", "learning_rate", "status", "error")


def optimizer_row(optimizer: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; None with one seed) over the complete runs of one optimizer."""
    done = [r for r in rows if r["status"] == "complete"]
    out: dict[str, Any] = dict(
        kind="optimizer",
        optimizer=optimizer,
        learning_rate=rows[0]["learning_rate"],
        runs_complete=len(done),
        runs_total=len(rows),
    )
    out["status"] = "complete" if len(done) == len(rows) else ("failed" if not done else "partial")
    numeric = [
        k
        for k in dict.fromkeys(k for r in done for k in r)
        if k not in ID_COLUMNS and k != "target_step" and k != "target_seconds"
    ]
    for key in numeric:
        values = [r[key] for r in done if is_number(r.get(key))]
        out[key] = statistics.fmean(values) if values else None
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
    reached = [r for r in done if r["target_step"] is not None]
    out["target_reached"] = f"{len(reached)}/{len(rows)}"
    for key in ("target_step", "target_seconds"):
        # a mean over the seeds that got there would flatter an optimizer that mostly did not
        vals = [r[key] for r in reached]
        out[key] = statistics.fmean(vals) if reached and len(reached) == len(rows) else None
    return out


def rank_key(row: dict[str, Any]) -> tuple[int, float, float]:
    """Rank by final val/loss (non-finite or missing last), ties broken by eval/fd when present."""
    val = row.get("val/loss")
    fd = row.get("eval/fd")
    return (
        0 if row["runs_complete"] else 1,
        val if is_number(val) else math.inf,
        fd if is_number(fd) else math.inf,
    )


def build_summary(root: Path, target: float | None = None) -> dict[str, Any]:
    """The summary of a comparison folder: runs, optimizers (ranked), target, tuning trials, command."""
    root = Path(root)
    runs = load_comparison(root, "final")
    if not runs:
        raise UserError(f"no runs found in {root} (expected plan.json or runs/<run>/ folders)")
    rule = "given" if target is not None else f"worst optimizer's best val/loss x {TARGET_SLACK}"
    target = target if target is not None else default_target(runs)
    rows = [run_row(r, target) for r in runs]
    by_opt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_opt.setdefault(row["optimizer"], []).append(row)
    ranked = sorted((optimizer_row(name, rs) for name, rs in by_opt.items()), key=rank_key)
    for i, row in enumerate(ranked, start=1):
        row["rank"] = i
    tuning = [run_row(r, target) for r in load_comparison(root, "tune")]
    plan = read_json(root / "plan.json")
    return dict(
        target_val_loss=target,
        target_rule=rule,
        runs=rows,
        optimizers=ranked,
        tuning=tuning,
        command=plan.get("command"),
        chosen_lr=plan.get("chosen_lr", {}),
    )


def write_summary(summary: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """summary.json (everything) and summary.csv (one row per run, then one per optimizer)."""
    root = Path(root)
    json_path, csv_path = root / "summary.json", root / "summary.csv"
    json_path.write_text(json.dumps(clean_json(summary), indent=2) + "\n")
    rows = summary["runs"] + summary["optimizers"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return json_path, csv_path


def clean_json(value: Any) -> Any:
    """NaN/inf become null so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value


# ---- figures -----------------------------------------------------------------------------------


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(keys), 3) or 1
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_heatmap(summary: dict[str, Any], keys: list[str], path: Path) -> Path:
    """Final validation loss (mean over seeds) by optimizer and timestep bucket, values annotated.

    Colour is the loss relative to the best optimizer in the same bucket: bucket losses differ by orders of
    magnitude (heavy noise vs fine detail), so absolute colour would only show the buckets, not the optimizers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [row["optimizer"] for row in summary["optimizers"]]
    grid = np.array(
        [[row.get(k) if is_number(row.get(k)) else np.nan for k in keys] for row in summary["optimizers"]],
        dtype=float,
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket where every run failed stays NaN
        relative = grid / np.nanmin(np.where(np.isfinite(grid), grid, np.nan), axis=0, keepdims=True)
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2.5, 0.6 * len(names) + 1.6))
    image = ax.imshow(relative, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(keys)), [k.split("/", 1)[1] for k in keys])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("timestep bucket")
    finite = relative[np.isfinite(relative)]
    middle = float(np.median(finite)) if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "failed" if not math.isfinite(grid[i, j]) else f"{grid[i, j]:.4g}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if math.isfinite(relative[i, j]) and relative[i, j] < middle else "black",
            )
    fig.colorbar(image, ax=ax, label="final val loss / best in bucket")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def make_figures(summary: dict[str, Any], runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """All report figures as PNG files in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    all_records = [rec for run in runs for rec in run.records]
    val_keys = ["val/loss", *bucket_keys(all_records, "val_t")]
    figures = {
        "val_loss": plot_curves(runs, val_keys, out_dir / "val_loss_by_bucket.png", "val loss"),
        "grad_lr": plot_curves(runs, ["train/grad_norm", "train/lr"], out_dir / "grad_norm_lr.png", ""),
    }
    buckets = bucket_keys(all_records, "val_t") or ["val/loss"]
    figures["heatmap"] = plot_heatmap(summary, buckets, out_dir / "final_val_heatmap.png")
    return figures


def final_grid(run: Run) -> Path | None:
    """The run's final sample grid: run_summary's sample_grid, else the last samples/step_*.png."""
    named = run.summary.get("sample_grid")
    if named and (run.path / named).is_file():
        return run.path / named
    grids = sorted((run.path / "samples").glob("step_*.png")) if (run.path / "samples").is_dir() else []
    return grids[-1] if grids else None


# ---- tables and documents ----------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def pm(row: dict[str, Any], key: str) -> str:
    """`mean ± std` of an optimizer row's metric."""
    std = row.get(key + "_std")
    return fmt(row.get(key)) + (f" ± {std:.2g}" if is_number(std) else "")


def ranking_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = [
        "rank",
        "optimizer",
        "lr",
        "runs ok",
        "val/loss",
        "train/loss",
        "eval/fd",
        "confident",
        "steps to target",
        "s to target",
        "img/s",
        "peak MB",
        "state MB",
        "non-finite",
        "spikes",
        "clipped",
        "status",
    ]
    body = []
    for r in summary["optimizers"]:
        target = (
            (fmt(r["target_step"]), fmt(r["target_seconds"]))
            if r["target_step"] is not None
            else (f"not reached ({r['target_reached']})", "-")
        )
        body.append(
            [
                str(r["rank"]),
                r["optimizer"],
                fmt(r["learning_rate"]),
                f"{r['runs_complete']}/{r['runs_total']}",
                pm(r, "val/loss"),
                pm(r, "train/loss"),
                pm(r, "eval/fd"),
                pm(r, "eval/confident_frac"),
                *target,
                pm(r, "perf/images_per_sec"),
                pm(r, "perf/peak_memory_mb"),
                pm(r, "optim/state_mb"),
                pm(r, "nonfinite_steps"),
                pm(r, "loss_spikes"),
                pm(r, "clipped_fraction_mean"),
                r["status"].upper() if r["status"] != "complete" else "ok",
            ]
        )
    return head, body


def runs_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "run",
        "optimizer",
        "lr",
        "seed",
        "status",
        "steps",
        "val/loss",
        "train/loss",
        "steps to target",
        "error",
    ]
    body = [
        [
            r["run"],
            r["optimizer"],
            fmt(r["learning_rate"]),
            fmt(r["seed"]),
            r["status"].upper() if r["status"] != "complete" else "complete",
            fmt(r["steps"]),
            fmt(r.get("val/loss")),
            fmt(r.get("train/loss")),
            fmt(r["target_step"]) if r["target_step"] is not None else "not reached",
            (r["error"] or "").splitlines()[-1][:200] if r["error"] else "",
        ]
        for r in rows
    ]
    return head, body


def bucket_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(
        dict.fromkeys(
            k for r in summary["optimizers"] for k in r if BUCKET_RE.match(k) or k.startswith("eval/")
        )
    )
    keys = [k for k in keys if not k.endswith("_std")]
    return ["optimizer", *keys], [[r["optimizer"], *[pm(r, k) for k in keys]] for r in summary["optimizers"]]


def md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def html_table(head: list[str], body: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = []
    for row in body:
        bad = any(c in ("FAILED", "INCOMPLETE", "MISSING", "PARTIAL") for c in row)
        cls = ' class="bad"' if bad else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    table = f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'  # wide bucket tables scroll instead of running off the page


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td:nth-child(2) { text-align: left; }
tr.bad td { background: #fde8e8; color: #900; }
.scroll { overflow-x: auto; } img { max-width: 100%; } .grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; text-align: center; } figure img { image-rendering: pixelated; width: 192px; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; white-space: pre-wrap; }
"""

SECTIONS = (
    "Ranking",
    "Validation loss by timestep bucket",
    "Final validation loss by timestep bucket",
    "Gradient norm and learning rate",
    "Final sample grids",
    "Runs",
    "Learning-rate tuning",
    "Reproduce",
)


def grid_entries(runs: list[Run]) -> list[tuple[str, Path | None]]:
    """(caption, final grid or None) for every run, so a run without a grid still shows up."""
    return [
        (f"{r.optimizer} lr={fmt(r.learning_rate)} seed={r.seed} [{r.status}]", final_grid(r)) for r in runs
    ]


def intro(summary: dict[str, Any]) -> str:
    target = summary["target_val_loss"]
    return (
        f"Target validation loss: {fmt(target)} ({summary['target_rule']}). Ranked by final val/loss "
        f"(mean over seeds), ties broken by eval/fd. Loss spike: train/loss > {SPIKE_FACTOR:g}x the median "
        f"of all earlier values. ± is the sample standard deviation over seeds."
    )


def write_html(summary: dict[str, Any], runs: list[Run], figures: dict[str, Path], path: Path) -> Path:
    """A self-contained report.html: CSS inline, every image embedded as base64."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Optimizer comparison</title>"
        f"<style>{CSS}</style></head><body><h1>Optimizer comparison</h1>",
        f"<p>{html.escape(intro(summary))}</p>",
        "<h2>Ranking</h2>",
        html_table(*ranking_table(summary)),
        html_table(*bucket_table(summary)),
        "<h2>Validation loss by timestep bucket</h2>",
        "<p>Mean over seeds; the band spans the seeds' min and max.</p>",
        embed_png(figures["val_loss"], "validation loss by timestep bucket"),
        "<h2>Final validation loss by timestep bucket</h2>",
        embed_png(figures["heatmap"], "heatmap"),
        "<h2>Gradient norm and learning rate</h2>",
        embed_png(figures["grad_lr"], "grad norm and lr"),
        "<h2>Final sample grids</h2><div class='grids'>",
    ]
    for caption, grid in grid_entries(runs):
        img = embed_png(grid, caption) if grid else "<p><b>no sample grid</b></p>"
        parts.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["</div>", "<h2>Runs</h2>", html_table(*runs_table(summary["runs"]))]
    if summary["tuning"]:
        parts += ["<h2>Learning-rate tuning</h2>", html_table(*runs_table(summary["tuning"]))]
    command = summary["command"] or "(no plan.json: this folder was not made by `diffusers-optim compare`)"
    parts += ["<h2>Reproduce</h2>", f"<pre>{html.escape(command)}</pre>", "</body></html>"]
    path.write_text("\n".join(parts))
    return path


def write_markdown(summary: dict[str, Any], runs: list[Run], figures: dict[str, Path], path: Path) -> Path:
    """report.md, with its PNGs (figures and copies of the sample grids) in report_files/ beside it."""
    fig_dir = path.parent / FIGURES_DIR

    def rel(p: Path) -> str:
        return p.relative_to(path.parent).as_posix()

    lines = [
        "# Optimizer comparison",
        "",
        intro(summary),
        "",
        "## Ranking",
        "",
        md_table(*ranking_table(summary)),
        "",
        md_table(*bucket_table(summary)),
        "",
        "## Validation loss by timestep bucket",
        "",
        f"![validation loss by bucket]({rel(figures['val_loss'])})",
        "",
        "## Final validation loss by timestep bucket",
        "",
        f"![heatmap]({rel(figures['heatmap'])})",
        "",
        "## Gradient norm and learning rate",
        "",
        f"![grad norm and lr]({rel(figures['grad_lr'])})",
        "",
        "## Final sample grids",
        "",
    ]
    for (caption, grid), run in zip(grid_entries(runs), runs):
        if grid:
            copy = fig_dir / f"grid_{run.name}.png"
            copy.write_bytes(grid.read_bytes())
            lines.append(f"![{caption}]({rel(copy)})  \n{caption}\n")
        else:
            lines.append(f"**no sample grid**: {caption}\n")
    lines += ["## Runs", "", md_table(*runs_table(summary["runs"])), ""]
    if summary["tuning"]:
        lines += ["## Learning-rate tuning", "", md_table(*runs_table(summary["tuning"])), ""]
    lines += ["## Reproduce", "", "```", summary["command"] or "(no plan.json)", "```", ""]
    path.write_text("\n".join(lines))
    return path


def summarize(root: str | Path, target: float | None = None) -> dict[str, Path]:
    """Rebuild summary.json/csv, report.html and report.md of a comparison folder; returns their paths."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"comparison folder not found: {root}")
    summary = build_summary(root, target)
    runs = load_comparison(root, "final")
    json_path, csv_path = write_summary(summary, root)
    figures = make_figures(summary, runs, root / FIGURES_DIR)
    return dict(
        summary_json=json_path,
        summary_csv=csv_path,
        report_html=write_html(summary, runs, figures, root / "report.html"),
        report_md=write_markdown(summary, runs, figures, root / "report.md"),
    )


def print_ranking(root: Path) -> str:
    """The ranking table as markdown text (what `compare` and `summarize` print at the end)."""
    summary = read_json(Path(root) / "summary.json")
    return md_table(*ranking_table(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-optim summarize", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="A comparison folder (made by `diffusers-optim compare`).")
    parser.add_argument(
        "--target_val_loss",
        type=float,
        default=None,
        help=f"Validation loss to time every run to (default: worst optimizer's best x {TARGET_SLACK}).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = summarize(args.output_dir, args.target_val_loss)
    for name, path in paths.items():
        logger.info("%-12s %s", name, path)
    logger.info("\n%s", print_ranking(Path(args.output_dir)))
    return 0
