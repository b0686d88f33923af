"""The summary of a comparison: one row per run, one per optimizer over seeds, ranked; summary.json/csv."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from diffusers_optim.errors import UserError
from diffusers_optim.report.reading import (
    Run,
    bucket_keys,
    is_number,
    last_value,
    load_comparison,
    read_json,
    series,
)

SPIKE_FACTOR = 3.0  # a loss spike: train/loss above this multiple of the running median so far
SPIKE_MIN_HISTORY = 3  # the running median needs a few points before it means anything
TARGET_SLACK = 1.1  # default target: the worst optimizer's best val/loss times this


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

