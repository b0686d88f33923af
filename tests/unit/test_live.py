"""The comparison's progress board, fed by status files as the trainers write them (progress.write_status)."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pytest

from diffusers_optim.live import ProgressBoard, final_lines, live_view
from diffusers_optim.progress import RunStatus, format_duration, read_status

RUNS = [("adam-lr0.002-s0", "runs/adam-lr0.002-s0"), ("sgd-lr0.05-s0", "runs/sgd-lr0.05-s0"),
        ("lion-lr0.0002-s0", "runs/lion-lr0.0002-s0")]


def trainer_status(root: Path, path: str, step: int, max_steps: int = 100, phase: str | None = None) -> RunStatus:
    """What a trainer at `step` has written: the status of a RunStatus that started at step 0."""
    (root / path).mkdir(parents=True, exist_ok=True)
    status = RunStatus(root / path, Path(path).name, max_steps)
    status.start_training(0)
    status.t0 -= 10.0  # ten seconds of training so far
    status.update(step=step, loss=0.25, images_per_sec=150.0, lr=1e-3)
    if phase:
        status.update(phase=phase)
    return status


def test_run_lines_and_overall_line_from_status_files(tmp_path: Path):
    board = ProgressBoard(tmp_path, RUNS)
    board.started("adam-lr0.002-s0")
    board.started("sgd-lr0.05-s0")
    trainer_status(tmp_path, RUNS[0][1], 0)
    trainer_status(tmp_path, RUNS[1][1], 0)
    board.poll()  # first sight: both at step 0, training
    trainer_status(tmp_path, RUNS[0][1], 40)
    trainer_status(tmp_path, RUNS[1][1], 20, phase="quality evaluation")
    board.poll()
    adam, sgd = board.running()
    assert board.run_line(adam).startswith("adam-lr0.002-s0: step 40/100, loss 0.25, 150 img/s, ETA 15")
    assert board.run_line(sgd).endswith(", quality evaluation")
    assert board.steps() == (60, 300)  # the queued run counts with the same budget
    eta = board.eta()
    assert eta is not None and eta > 0
    assert board.overall_line().startswith("runs: 0/3 runs finished, 2 running, steps 60/300, ETA ")

    board.finished("adam-lr0.002-s0", ok=True)
    board.finished("sgd-lr0.05-s0", ok=False)
    assert "1 FAILED" in board.overall_line() and "2/3 runs finished" in board.overall_line()


def test_a_run_that_has_not_written_yet_is_starting(tmp_path: Path):
    board = ProgressBoard(tmp_path, RUNS[:1])
    board.started(RUNS[0][0])
    board.poll()
    assert board.run_line(board.running()[0]) == f"{RUNS[0][0]}: starting"
    assert board.overall_line().endswith("steps 0/?, ETA ?")


def step_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"{RUNS[0][0]}: step" in r.getMessage()]


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll until condition() (the printing thread runs on its own clock; the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_plain_lines_when_stdout_is_not_a_terminal(tmp_path: Path, caplog):
    board = ProgressBoard(tmp_path, RUNS[:1])
    with caplog.at_level(logging.INFO, logger="diffusers_optim.live"), live_view(board, 0.05, io.StringIO()):
        board.started(RUNS[0][0])
        trainer = trainer_status(tmp_path, RUNS[0][1], 10)
        wait_for(lambda: any("step 10/100" in line for line in step_lines(caplog)))
        time.sleep(0.3)  # several periods without a move: no new line
        trainer.update(step=30)
        wait_for(lambda: any("step 30/100" in line for line in step_lines(caplog)))
    steps = step_lines(caplog)
    assert any("step 10/100" in line for line in steps) and any("step 30/100" in line for line in steps)
    assert len(steps) == 2  # a line when the run moved, not one per period


def test_status_file_is_replaced_whole(tmp_path: Path):
    status = trainer_status(tmp_path, "runs/a", 5)
    assert read_status(tmp_path / "runs/a")["step"] == 5
    with status.phase("final sampling", "16 images", 100):
        assert read_status(tmp_path / "runs/a")["phase"] == "final sampling"
    assert read_status(tmp_path / "runs/a")["phase"] == "training"
    assert not list((tmp_path / "runs/a").glob("*.tmp"))


@pytest.mark.parametrize("seconds, text", [(4.24, "4.2 s"), (245, "4m05s"), (3725, "1h02m"), (None, "?")])
def test_durations_for_people(seconds, text):
    assert format_duration(seconds) == text


def test_final_lines_are_compact():
    summary = {"rank_by": "val/loss", "arms": [
        {"rank": 1, "arm": "adamw", "val/loss": 0.19703, "val/loss_ci_low": 0.19493, "val/loss_ci_high": 0.19913,
         "runs_complete": 2, "runs_total": 2, "status": "complete"},
        {"rank": 2, "arm": "rmsprop", "val/loss": None, "runs_complete": 0, "runs_total": 2,
         "status": "failed"}]}
    text = final_lines(summary, Path("/out/report.html"))
    assert text.splitlines() == [
        "ranking by final val/loss (mean over seeds ± 95% interval, lower is better):",
        "   1  adamw    0.197 ± 0.0021  (2/2 runs)",
        "   2  rmsprop  -  (0/2 runs)  FAILED",
        "report: /out/report.html",
    ]


def test_final_lines_show_intervals_and_ties():
    summary = {"rank_by": "eval/fd", "higher_is_better": False, "arms": [
        {"rank": 1, "arm": "adamw", "eval/fd": 0.6, "eval/fd_ci_low": 0.55, "eval/fd_ci_high": 0.65,
         "runs_complete": 3, "runs_total": 3, "status": "complete", "best": True},
        {"rank": 2, "arm": "adam", "eval/fd": 0.61, "eval/fd_ci_low": 0.5, "eval/fd_ci_high": 0.72,
         "runs_complete": 3, "runs_total": 3, "status": "complete", "tied": True}]}
    lines = final_lines(summary, Path("r.html")).splitlines()
    assert lines[0] == "ranking by final eval/fd (mean over seeds ± 95% interval, lower is better):"
    assert lines[1] == "   1  adamw  0.600 ± 0.050  (3/3 runs)"
    assert lines[2] == "   2  adam   0.610 ± 0.11  (3/3 runs)  (tied with the best: difference not resolved)"
