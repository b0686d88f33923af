"""Summaries and local reports built from synthetic run folders written by hand."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_optim import report

BUCKETS = ("000-499", "500-999")


def write_run(
    root: Path,
    name: str,
    optimizer: str,
    lr: float,
    seed: int,
    val: list[float],
    train: list[float] | None = None,
    complete: bool = True,
    fd: float | None = None,
) -> Path:
    """A run folder following the run-directory contract; val/loss is logged every 10 steps."""
    path = root / "runs" / name
    (path / "samples").mkdir(parents=True)
    config = {
        "config": {"optimizer": optimizer, "learning_rate": lr, "seed": seed},
        "optimizer": {"name": optimizer, "hparams": {"lr": lr}},
        "run_name": name,
        "command": "x",
    }
    (path / "config.json").write_text(json.dumps(config))
    train = train or [1.0 - 0.01 * i for i in range(len(val))]
    lines = []
    for i, (v, t) in enumerate(zip(val, train)):
        step = 10 * (i + 1)
        rec = {
            "step": step,
            "elapsed_s": 2.0 * step,
            "train/loss": t,
            "val/loss": v,
            f"val_t/{BUCKETS[0]}": 2 * v,
            f"val_t/{BUCKETS[1]}": v / 2,
            f"loss_t/{BUCKETS[0]}": 2 * t,
            "train/grad_norm": 1.0 + i,
            "train/lr": lr,
            "train/clipped_fraction": 0.5 * (i % 2),
            "perf/images_per_sec": 100.0 + i,
            "perf/process_peak_rss_mb": 50.0 + i,
            "optim/state_mb": 3.0,
        }
        lines.append(json.dumps(rec))
    if fd is not None:
        lines.append(json.dumps({"step": 10 * len(val), "elapsed_s": 20.0 * len(val), "eval/fd": fd}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    grid = np.full((8, 8, 3), 40 * seed, dtype=np.uint8)
    Image.fromarray(grid).save(path / "samples" / f"step_{10 * len(val):06d}.png")
    if complete:
        summary = {
            "status": "complete",
            "steps": 10 * len(val),
            "wall_time_s": 20.0 * len(val),
            "sample_grid": f"samples/step_{10 * len(val):06d}.png",
            "nonfinite_steps": 0,
        }
        (path / "run_summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    write_run(tmp_path, "adamw-lr0.001-s0", "adamw", 1e-3, 0, [1.0, 0.5, 0.30], fd=5.0)
    write_run(tmp_path, "adamw-lr0.001-s1", "adamw", 1e-3, 1, [1.0, 0.6, 0.40], fd=7.0)
    write_run(tmp_path, "sgd-lr0.01-s0", "sgd", 1e-2, 0, [1.0, 0.9, 0.80])
    write_run(tmp_path, "sgd-lr0.01-s1", "sgd", 1e-2, 1, [1.0, 0.95], complete=False)
    return tmp_path


def by(rows, **match):
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def test_summary_numbers_match_metrics(comparison: Path):
    summary = report.build_summary(comparison)
    run = by(summary["runs"], run="adamw-lr0.001-s1")
    assert run["val/loss"] == 0.40 and run["train/loss"] == pytest.approx(0.98)
    assert run[f"val_t/{BUCKETS[0]}"] == 0.80 and run["eval/fd"] == 7.0
    assert run["steps"] == 30 and run["perf/process_peak_rss_mb"] == 52.0
    assert run["perf/images_per_sec"] == pytest.approx(101.0)
    assert run["clipped_fraction_mean"] == pytest.approx(0.5 / 3)
    adamw = by(summary["arms"], arm="adamw")
    assert adamw["val/loss"] == pytest.approx(0.35)
    assert adamw["val/loss_std"] == pytest.approx(statistics.stdev([0.3, 0.4]))
    assert adamw["eval/fd"] == pytest.approx(6.0)
    # sgd's only complete seed alone makes its numbers; the incomplete one is marked, not averaged
    sgd = by(summary["arms"], arm="sgd")
    assert sgd["runs_complete"] == 1 and sgd["status"] == "partial" and sgd["val/loss"] == 0.80
    assert by(summary["runs"], run="sgd-lr0.01-s1")["status"] == "incomplete"
    assert [r["arm"] for r in summary["arms"]] == ["adamw", "sgd"]


def test_default_target_and_time_to_target(comparison: Path):
    summary = report.build_summary(comparison)
    # worst optimizer's best val/loss: sgd's 0.80, times 1.1
    assert summary["target_val_loss"] == pytest.approx(0.88)
    assert by(summary["runs"], run="adamw-lr0.001-s0")["target_step"] == 20
    assert by(summary["runs"], run="adamw-lr0.001-s0")["target_seconds"] == 40.0
    assert by(summary["runs"], run="sgd-lr0.01-s0")["target_step"] == 30
    given = report.build_summary(comparison, target=0.35)
    assert by(given["runs"], run="adamw-lr0.001-s0")["target_step"] == 30
    assert by(given["runs"], run="adamw-lr0.001-s1")["target_step"] is None
    adamw = by(given["arms"], arm="adamw")
    assert adamw["target_reached"] == "1/2" and adamw["target_step"] is None


def test_spikes():
    assert report.count_spikes([1.0, 1.0, 1.0, 3.5, 1.0, math.nan]) == 2
    assert report.count_spikes([1.0, 5.0, 0.9]) == 0  # too little history to call a spike


def test_reports_written_with_sections_and_embedded_images(comparison: Path):
    paths = report.summarize(comparison)
    text = paths["report_html"].read_text()
    titles = ["Ranking", "Validation loss by timestep bucket", "Final validation loss by timestep bucket"]
    titles += ["Gradient norm and step size", "Final sample grids", "Runs", "Reproduce"]
    for section in titles:
        assert f"<h2>{section}</h2>" in text
    # four figures + four sample grids, all inline; no external files referenced
    assert text.count('src="data:image/png;base64,') == 8
    assert 'src="report_files' not in text and "INCOMPLETE" in text
    md = paths["report_md"].read_text()
    for link in [
        "report_files/val_loss_by_bucket.png",
        "report_files/final_val_heatmap.png",
        "report_files/grid_sgd-lr0.01-s1.png",
    ]:
        assert link in md and (comparison / link).is_file()
    with paths["summary_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["run"] * 4 + ["arm"] * 2
    assert float(rows[0]["val/loss"]) == 0.30
    assert json.loads(paths["summary_json"].read_text())["arms"][0]["arm"] == "adamw"


def test_planned_failed_and_missing_runs_are_shown(comparison: Path):
    plan = {
        "command": "diffusers-optim compare --optimizers adamw sgd lion",
        "runs": [
            {
                "name": "adamw-lr0.001-s0",
                "optimizer": "adamw",
                "learning_rate": 1e-3,
                "seed": 0,
                "stage": "final",
                "path": "runs/adamw-lr0.001-s0",
            },
            {
                "name": "lion-lr3e-05-s0",
                "optimizer": "lion",
                "learning_rate": 3e-5,
                "seed": 0,
                "stage": "final",
                "path": "runs/lion-lr3e-05-s0",
            },
        ],
    }
    (comparison / "plan.json").write_text(json.dumps(plan))
    (comparison / "failures.json").write_text(json.dumps({"lion-lr3e-05-s0": "RuntimeError: boom"}))
    paths = report.summarize(comparison)
    summary = json.loads(paths["summary_json"].read_text())
    lion = by(summary["arms"], arm="lion")
    assert lion["status"] == "failed" and lion["rank"] is None and lion["unranked"] == "run failed"  # not "last"
    html_text = paths["report_html"].read_text()
    assert "FAILED" in html_text and "RuntimeError: boom" in html_text and plan["command"] in html_text
    assert "lion lr=3e-5 seed=0 [failed]" in html_text  # its grid slot is shown, empty


def test_summarize_cli_errors_on_empty_folder(tmp_path: Path):
    from diffusers_optim.errors import UserError

    with pytest.raises(UserError, match="no runs found"):
        report.main([str(tmp_path)])


def test_floor_and_standard_errors_are_shown(comparison: Path):
    """The metric keys of metrics/keys.py: a run's val/loss_se next to its val/loss, the FD floor in the findings."""
    for name, floor, se in [("adamw-lr0.001-s0", 0.30, 0.0021), ("adamw-lr0.001-s1", 0.34, 0.0025)]:
        with (comparison / "runs" / name / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 30, "eval_floor/fd": floor, "val/loss_se": se}) + "\n")
    paths = report.summarize(comparison)
    md = paths["report_md"].read_text()
    assert "Ranked by eval/fd (lower is better)" in md  # the quality metric is the default ranking
    assert "Floor of eval/fd: 0.32, the score of real held-out images" in md
    assert "| 0.3 ± se 0.0021 |" in md and "| 0.4 ± se 0.0025 |" in md
    summary = json.loads(paths["summary_json"].read_text())
    assert by(summary["arms"], arm="adamw")["eval_floor/fd"] == pytest.approx(0.32)
