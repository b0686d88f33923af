"""Reading a comparison folder: run folders, their metrics.jsonl, and the numbers in them.

Layout of a comparison folder (written by compare.py): plan.json, failures.json, runs/<run>/ (one training run
each), tuning/<run>/ (the lr-grid trials).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_optim.arms import default_settings, settings_from_args

# the run folder's owner reads JSON and metrics.jsonl for everyone (torn last lines skipped and reported)
from diffusers_optim.rundir import METRICS, SUMMARY, read_json, read_metrics  # noqa: F401

logger = logging.getLogger(__name__)

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
    summary: dict[str, Any] = field(default_factory=dict)  # run_summary.json: a complete run's final values
    curves_missing: str | None = None  # why a complete run's metrics.jsonl gives no (or cut) curves, if it does not
    config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the full training config: what makes its arm
    arm: str = ""  # the arm's name, set once all runs of the comparison are known (summary.label_arms)
    planned_arm: str = ""  # the name plan.json gives its arm (a plan of this version; "" for a run added by hand)


def load_run(path: Path, planned: dict[str, Any] | None = None, error: str | None = None) -> Run:
    """Read one run folder; `planned` (from plan.json) names runs that never produced a folder."""
    planned = planned or {}
    config = read_json(path / "config.json")
    summary = read_json(path / SUMMARY)
    train_cfg = config.get("config", {})
    if train_cfg:
        settings = {
            **default_settings(),
            **train_cfg,
        }  # keys added since the run was trained take their defaults
    elif planned.get("args"):
        settings = settings_from_args(planned["args"])  # planned, but never wrote its config
    else:  # nothing but a name (a plan without flags, a folder without config.json): an arm of its own
        optimizer = planned.get("optimizer") or path.name
        settings = {
            **default_settings(),
            "optimizer": optimizer,
            "learning_rate": planned.get("learning_rate"),
        }
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
    records = read_metrics(path / METRICS)
    return Run(
        name=planned.get("name", path.name),
        path=path,
        optimizer=optimizer or path.name,
        learning_rate=planned.get("learning_rate", train_cfg.get("learning_rate")),
        seed=planned.get("seed", train_cfg.get("seed")),
        status=status,
        error=error,
        records=records,
        summary=summary,
        curves_missing=missing_curves(path, records, summary) if status == "complete" else None,
        config=config,
        settings=settings,
    )


def missing_curves(path: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> str | None:
    """Why a complete run's curves are lost or cut short (its metrics.jsonl deleted or damaged), None if whole."""
    if not (path / METRICS).is_file():
        return f"{METRICS} is missing"
    if not records:
        return f"{METRICS} has no readable record"
    last, steps = records[-1].get("step"), summary.get("steps")
    if is_number(last) and is_number(steps) and last < steps:  # a complete run logs its last step
        return f"{METRICS} ends at step {last} of {steps}"
    return None


def load_comparison(root: Path, stage: str = "final") -> list[Run]:
    """The runs of one stage ("final" or "tune"): the planned ones in plan order, then folders added by hand."""
    root = Path(root)
    plan = read_json(root / "plan.json")
    failures = read_json(root / "failures.json")
    planned = [r for r in plan.get("runs", []) if r.get("stage", "final") == stage]
    runs = [load_run(root / r["path"], r, failures.get(r["name"])) for r in planned]
    share_arm_settings(runs, planned)
    if plan.get("arms") and all("slug" in a for a in plan["arms"]):  # named by arms.arm_names (older plans: not)
        for run, entry in zip(runs, planned):
            run.planned_arm = entry.get("arm", "")
    known = {(root / r["path"]).resolve() for r in planned}
    folder = root / ("runs" if stage == "final" else "tuning")
    dirs = sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    return runs + [load_run(p, error=failures.get(p.name)) for p in dirs if p.resolve() not in known]


def share_arm_settings(runs: list[Run], planned: list[dict[str, Any]]) -> None:
    """A planned run that never wrote config.json takes the recorded settings of a run of the same planned arm,
    else those of any recorded run of the comparison with its own planned flags on top.

    The trainer records the values it resolved (a default warmup, the schedule), which the plan's flags leave
    open; without this, a run that failed early would look like an arm of its own, or differ from the others
    in a setting nobody chose.
    """
    recorded: dict[str, dict[str, Any]] = {}
    for run, plan in zip(runs, planned):
        if run.config.get("config"):
            recorded.setdefault(plan.get("arm"), run.settings)
    sibling = next(iter(recorded.values()), None)
    for run, plan in zip(runs, planned):
        if run.config.get("config") or sibling is None:
            continue
        if plan.get("arm") is not None and plan["arm"] in recorded:
            run.settings = {**recorded[plan["arm"]], "seed": run.seed}
        elif plan.get("args"):
            run.settings = settings_from_args(plan["args"], base=sibling)


def final_grid(run: Run) -> Path | None:
    """The run's final sample grid: run_summary's sample_grid, else the last samples/step_*.png."""
    named = run.summary.get("sample_grid")
    if named and (run.path / named).is_file():
        return run.path / named
    grids = sorted((run.path / "samples").glob("step_*.png")) if (run.path / "samples").is_dir() else []
    return grids[-1] if grids else None


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


def final_record(run: Run) -> dict[str, Any]:
    """A complete run's final values as run_summary.json holds them ({} for any other run)."""
    final = run.summary.get("final") if run.status == "complete" else None
    return final if isinstance(final, dict) else {}


def final_value(run: Run, key: str) -> float | None:
    """A metric's final value: run_summary.json's for a complete run (the owner's record of its end, which stands
    when metrics.jsonl is lost), else the last value in metrics.jsonl; NaN if non-finite, None if never logged."""
    final = final_record(run)
    if key in final:
        return float(final[key]) if is_number(final[key]) else math.nan
    return last_value(run.records, key)


def bucket_keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    """The timestep-bucket keys (`val_t/000-249`, ...) seen in the records, in timestep order."""
    keys = {k for rec in records for k in rec if k.startswith(prefix + "/") and BUCKET_RE.match(k)}
    return sorted(keys, key=lambda k: int(BUCKET_RE.match(k).group(1)))
