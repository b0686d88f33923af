"""The summary of a comparison: one row per run, one per arm over seeds (with intervals), ranked; summary.json/csv."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from diffusers_optim.arms import arm_identity, arm_names, arm_settings, differing_settings
from diffusers_optim.errors import UserError
from diffusers_optim.metrics.keys import primary_metric
from diffusers_optim.report.reading import (
    METRICS,
    SUMMARY,
    Run,
    bucket_keys,
    final_record,
    final_value,
    is_number,
    last_value,
    load_comparison,
    read_json,
    series,
)
from diffusers_optim.report.stats import CONFIDENCE, estimate, higher_is_better, rank_arms
from diffusers_optim.report.verdicts import (
    ALPHA,
    BEST,
    BETTER,
    RANKING_SHARE,
    WORSE,
    KeyVerdicts,
    Verdict,
    default_min_effect,
    family_alphas,
    judge,
)

logger = logging.getLogger(__name__)

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
    """The worst arm's best val/loss x TARGET_SLACK, so every arm that learns reaches it."""
    best: dict[str, float] = {}
    for run in runs:
        value = best_val_loss(run)
        if value is not None:
            best[run.arm] = min(value, best.get(run.arm, math.inf))
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
        arm=run.arm,
        optimizer=run.settings.get("optimizer", run.optimizer),
        run=run.name,
        seed=run.seed,
        learning_rate=run.learning_rate,
        status=run.status,
        error=run.error,
    )
    row["steps"] = run.summary.get("steps", recs[-1]["step"] if recs else None)
    row["wall_time_s"] = run.summary.get("wall_time_s", recs[-1].get("elapsed_s") if recs else None)
    known = [*recs, final_record(run)]  # keys logged, or kept in run_summary.json when metrics.jsonl is lost
    for key in ["train/loss", "val/loss", *bucket_keys(known, "loss_t"), *bucket_keys(known, "val_t")]:
        row[key] = final_value(run, key)
    # every validation and quality key (their standard errors, raw-weights twins and floors too)
    measured = {k for rec in known for k in rec if k.split("/")[0].startswith(("val", "eval"))}
    for key in sorted(measured - set(row)):
        row[key] = final_value(run, key)
    row["curves_missing"] = run.curves_missing  # then what is computed from the curves below is unknown (None)
    hit = time_to_target(recs, target) if target is not None else None
    row["target_step"], row["target_seconds"] = hit if hit else (None, None)
    row["perf/images_per_sec"] = mean_of(recs, "perf/images_per_sec")
    for key in ("perf/device_peak_memory_mb", "perf/process_peak_rss_mb", "optim/state_mb",
                "optim/state_bytes_per_param"):
        row[key] = max_of(recs, key)
    nonfinite = run.summary.get("nonfinite_steps", last_value(recs, "train/nonfinite_steps"))
    row["nonfinite_steps"] = int(nonfinite) if is_number(nonfinite) else None
    row["loss_spikes"] = count_spikes(series(recs, "train/loss")[1]) if recs else None
    row["clipped_fraction_mean"] = mean_of(recs, "train/clipped_fraction")
    return row


ID_COLUMNS = ("kind", "arm", "optimizer", "run", "seed", "learning_rate", "status", "error")
NOT_AVERAGED = (*ID_COLUMNS, "target_step", "target_seconds", "curves_missing", "unranked")


def label_arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs into arms by their full training settings and name each arm; runs keep plan order.

    The names are plan.json's when every arm is one planned arm (compare named them with arms.arm_names before
    training: a tuned lr stays out of the name), else arm_names of the recorded settings (runs added by hand)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(arm_identity(run.settings), []).append(run)
    planned = [{run.planned_arm for run in group} for group in groups.values()]
    labels = [next(iter(p)) for p in planned]
    if not all(len(p) == 1 and "" not in p for p in planned) or len(set(labels)) < len(labels):
        labels = arm_names([arm_settings(g[0].settings) for g in groups.values()])
    for label, group in zip(labels, groups.values()):
        for run in group:
            run.arm = label
    return {label: group for label, group in zip(labels, groups.values())}


def arm_row(arm: str, runs: list[Run], rows: list[dict[str, Any]], differing: dict[str, Any]) -> dict[str, Any]:
    """Per metric over the complete seeds of one arm: mean, std (ddof=1), n and the 95% t-interval.

    differing: the arm's settings that differ between the arms (arms.differing_settings)."""
    done = [r for r in rows if r["status"] == "complete"]
    settings = runs[0].settings
    out: dict[str, Any] = dict(
        kind="arm",
        arm=arm,
        optimizer=settings.get("optimizer"),
        settings=differing,
        learning_rate=rows[0]["learning_rate"],
        runs_complete=len(done),
        runs_total=len(rows),
    )
    out["status"] = "complete" if len(done) == len(rows) else ("failed" if not done else "partial")
    for key in dict.fromkeys(k for r in done for k in r if k not in NOT_AVERAGED):
        est = estimate([float(r[key]) for r in done if is_number(r.get(key))])
        if est.n:
            out[key], out[key + "_std"], out[key + "_n"] = est.mean, est.std, est.n
            out[key + "_ci_low"], out[key + "_ci_high"] = est.low, est.high
    reached = [r for r in done if r["target_step"] is not None]
    out["target_reached"] = f"{len(reached)}/{len(rows)}"
    # a run without curves: whether it got there is not known
    out["target_unknown"] = sum(1 for r in done if r.get("curves_missing"))
    for key in ("target_step", "target_seconds"):
        # a mean over the seeds that got there would flatter an arm that mostly did not
        vals = [r[key] for r in reached]
        out[key] = statistics.fmean(vals) if reached and len(reached) == len(rows) else None
    return out


def choose_rank_by(rows: list[dict[str, Any]], rank_by: str | None) -> str:
    """The metric to rank on: the one asked for (it must be logged), else the sample-quality metric, else val/loss."""
    logged = {k for r in rows for k, v in r.items() if is_number(v)}
    if rank_by is not None:
        if rank_by not in logged:
            from diffusers_optim.errors import unknown_choice

            raise unknown_choice("--rank_by metric", rank_by, sorted(k for k in logged if "/" in k))
        return rank_by
    return primary_metric(logged)


def per_seed(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    """{seed: value} of one metric over an arm's complete runs."""
    return {
        int(r["seed"]): float(r[key])
        for r in rows
        if r["status"] == "complete" and r.get("seed") is not None and is_number(r.get(key))
    }


def unranked_reason(row: dict[str, Any], metric: str) -> str | None:
    """Why a run gives no value of `metric` to rank by (it is left out of that ranking), None when it gives one."""
    if row["status"] != "complete":
        return f"run {row['status']}"
    if row.get(metric) is None:
        return f"no final {metric} in {SUMMARY} or {METRICS}"
    return None if is_number(row[metric]) else f"final {metric} not finite"


def rank(arm_rows: list[dict[str, Any]], rows_by_arm: dict[str, list[dict]], order: list[dict],
         ranking: KeyVerdicts) -> list[dict]:
    """Arm rows in rank order, each with its verdict against the best on the ranking metric (verdicts.judge) and
    `tied` (not resolved worse by a difference that matters); an arm with no value of the metric has rank None and
    `unranked`, the reason its runs give."""
    by_arm = {row["arm"]: row for row in arm_rows}
    ranked = []
    for entry in order:
        row = by_arm[entry["arm"]]
        found = ranking.of(entry["arm"])
        row.update(rank=entry["rank"], best=entry["best"], tied=False, diff_vs_best=None,
                   verdict=BEST if entry["best"] else None)
        if found is not None and not entry["best"]:
            row.update(verdict=found.verdict, tied=found.verdict != WORSE, diff_vs_best=comparison(found))
        elif not entry["best"] and entry["rank"] is not None:
            row.update(tied=True, verdict="no interval")
        reasons = dict.fromkeys(r["unranked"] for r in rows_by_arm[entry["arm"]] if r["unranked"])
        row["unranked"] = "; ".join(reasons) if entry["rank"] is None else None
        ranked.append(row)
    return ranked


def comparison(v: Verdict) -> dict[str, Any]:
    """A verdict as the report's comparison row: `a - b` in the metric's own units and direction (mean, low, high),
    with what it resolves (`resolved`: better or worse by at least min_effect)."""
    sign = -1.0 if higher_is_better(v.metric) else 1.0
    low, high = (v.low, v.high) if sign > 0 else (None if v.high is None else -v.high, None if v.low is None else -v.low)
    return dict(a=v.arm, b=v.best, metric=v.metric, seeds=v.seeds, n=len(v.seeds),
                mean=None if v.diff is None else sign * v.diff, low=low, high=high,
                resolved=v.verdict in (WORSE, BETTER), verdict=v.verdict, min_effect=v.min_effect,
                resolvable=v.resolvable, seeds_needed=v.seeds_needed)


def warn_missing_curves(runs: list[Run]) -> None:
    """One line per complete run whose metrics.jsonl is lost or damaged: what the report lacks for it."""
    for run in runs:
        if run.curves_missing:
            logger.warning("run %s: %s: its curves are missing from the report (and time to target, mean "
                           "throughput, peak memory and loss spikes with them); its final values come from %s",
                           run.name, run.curves_missing, SUMMARY)


def judge_keys(rows_by_arm: dict[str, list[dict]], keys: list[str], metric: str, best: str | None,
               min_effects: dict[str, float]) -> dict[str, KeyVerdicts]:
    """Every key's verdicts against the ranking's best arm, each key at its share of the report's error budget
    (verdicts.family_alphas); the intervals cover every pair, so the best being chosen from the data is allowed for."""
    alphas = family_alphas(keys, metric)
    tables = {key: {arm: per_seed(rows, key) for arm, rows in rows_by_arm.items()} for key in keys}
    return {key: judge(tables[key], key, alphas[key], min_effects[key], reference=best) for key in keys}


def min_effects_of(rows: list[dict[str, Any]], keys: list[str], given: dict[str, float]) -> dict[str, float]:
    """Each key's smallest difference that matters: the one given (--min_effect), else the runs' own measure."""
    done = [r for r in rows if r["status"] == "complete"]
    return {key: float(given[key]) if key in given else default_min_effect(key, done) for key in keys}


def build_summary(root: Path, target: float | None = None, rank_by: str | None = None,
                  min_effect: dict[str, float] | None = None) -> dict[str, Any]:
    """The summary of a comparison folder: runs, arms (ranked, with intervals), comparisons, target, command."""
    root = Path(root)
    plan = read_json(root / "plan.json")
    runs = load_comparison(root, "final")
    if not runs:
        raise UserError(f"no runs found in {root} (expected plan.json or runs/<run>/ folders)")
    arms = label_arms(runs)
    rule = "given" if target is not None else f"worst arm's best val/loss x {TARGET_SLACK}"
    target = target if target is not None else default_target(runs)
    rows = [run_row(r, target) for r in runs]
    warn_missing_curves(runs)
    rows_by_arm = {arm: [row for row in rows if row["arm"] == arm] for arm in arms}
    metric = choose_rank_by(rows, rank_by or plan.get("rank_by"))
    for row in rows:
        row["unranked"] = unranked_reason(row, metric)
    differing = differing_settings([arm_settings(g[0].settings) for g in arms.values()])
    arm_rows = [arm_row(arm, group, rows_by_arm[arm], diff) for (arm, group), diff in zip(arms.items(), differing)]
    keys = list(dict.fromkeys(
        [metric, *(k for r in rows for k in r if k == "val/loss" or k.startswith("val_t/"))]))
    effects = min_effects_of(rows, keys, {**plan.get("min_effect", {}), **(min_effect or {})})
    order = rank_arms({arm: per_seed(rows, metric) for arm, rows in rows_by_arm.items()}, metric)
    per_key = judge_keys(rows_by_arm, keys, metric, next((e["arm"] for e in order if e["best"]), None), effects)
    ranking = per_key[metric]
    ranked = rank(arm_rows, rows_by_arm, order, ranking)
    tuning_runs = load_comparison(root, "tune")
    label_arms(tuning_runs)
    best = next((row["arm"] for row in ranked if row["best"]), None)
    return dict(
        rank_by=metric,
        higher_is_better=higher_is_better(metric),
        confidence=CONFIDENCE,
        target_val_loss=target,
        target_rule=rule,
        runs=rows,
        arms=ranked,
        comparisons=[comparison(v) for key in keys for v in per_key[key].verdicts] if best else [],
        statistics=dict(alpha=ALPHA, ranking_share=RANKING_SHARE, family=family_alphas(keys, metric),
                        method=ranking.method, min_effect=effects, resolved_best=ranking.resolved_best),
        tuning=[run_row(r, target) for r in tuning_runs],
        command=plan.get("command"),
        chosen_lr=plan.get("chosen_lr", {}),
    )


def write_summary(summary: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """summary.json (everything) and summary.csv (one row per run, then one per arm)."""
    root = Path(root)
    json_path, csv_path = root / "summary.json", root / "summary.csv"
    json_path.write_text(json.dumps(clean_json(summary), indent=2) + "\n")
    rows = summary["runs"] + [{k: v for k, v in r.items() if k != "diff_vs_best"} for r in summary["arms"]]
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
