"""A tiny real comparison through the CLI: two optimizers, every report file, numbers that match the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN_FLAGS = [
    "--max_train_steps", "6", "--resolution", "8", "--train_batch_size", "8", "--ddpm_num_steps", "100",
    "--num_validation_images", "8", "--validation_steps", "3", "--logging_steps", "3", "--lr_warmup_steps", "1",
    "--sample_steps", "0", "--num_samples", "4", "--num_inference_steps", "2", "--num_eval_samples", "16",
    "--report_to", "none",
]  # fmt: skip


def compare(out: Path) -> subprocess.CompletedProcess:
    argv = [
        "--optimizers",
        "adamw:lr=1e-3",
        "sgd:lr=0.05,momentum=0.9",
        "--seeds",
        "0",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "diffusers_optim.cli", "compare", *argv, *TRAIN_FLAGS]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def last(path: Path, key: str) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r[key] for r in records if key in r][-1]


def test_tiny_comparison_end_to_end(tmp_path: Path):
    out = tmp_path / "cmp"
    result = compare(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in ["plan.json", "summary.json", "summary.csv", "report.html", "report.md"]:
        assert (out / name).is_file(), name
    assert "| rank | optimizer |" in result.stdout and "report.html" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert {r["status"] for r in summary["runs"]} == {"complete"}
    html = (out / "report.html").read_text()
    for row in summary["runs"]:
        metrics = out / "runs" / row["run"] / "metrics.jsonl"
        for key in ["val/loss", "train/loss", "val_t/00-24", "loss_t/75-99"]:
            assert row[key] == pytest.approx(last(metrics, key)), key
        opt = next(o for o in summary["optimizers"] if o["optimizer"] == row["optimizer"])
        assert opt["val/loss"] == pytest.approx(row["val/loss"])  # one seed: the mean is the run
        assert f"{row['val/loss']:.4g}" in html
    assert html.count("data:image/png;base64,") == 5  # three figures and both final sample grids
    md = (out / "report.md").read_text()
    assert md.count("](report_files/") == 5 and "diffusers-optim compare --optimizers" in md

    # the rerun reuses both finished runs: no trainer is started, nothing in the run folders changes
    logs = {p: p.read_text() for p in (out / "logs").glob("*.log")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run_summary.json")}
    again = compare(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing complete run") == 2
    assert {p: p.read_text() for p in logs} == logs and len(stamps) == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
