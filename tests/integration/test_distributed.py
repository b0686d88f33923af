"""Two real processes (`accelerate launch --multi_gpu --num_processes 2` on gloo): start-up without races,
and stops by signal that every process agrees on (issue 16)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT = 300


def free_port() -> int:
    """A free TCP port for the rendezvous, so tests running side by side never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: Path, *args: str) -> list[str]:
    """The command a user types to train on two CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), *args]


def two_process_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}


def test_two_processes_start_20_times_and_agree_on_every_start_up_check(offline_env, tmp_path):
    """Start-up checks raced by two processes give both the same verdict, decided by the main one; then 20 real
    Trainer starts (start, one step, one checkpoint) back to back in two processes, with no failure."""
    n = 20
    flags = [*TINY_FLAGS, "--max_train_steps", "2"]
    proc = subprocess.run(launch_command(HERE / "two_process_startup.py", str(tmp_path), str(n), *flags),
                          env=two_process_env(offline_env), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert len(main["calls"]) == n + 2 and other["calls"] == []  # only the main process touched the folders
    assert [c.get("result") for c in main["checks"]] == [c.get("result") for c in other["checks"]]
    assert all(c == {"result": "None"} for c in main["checks"][:n])  # fresh folders: no checkpoint, no error
    for rank, record in ((0, main), (1, other)):
        held, unwritable = record["checks"][n:]
        assert "already holds a run (metrics.jsonl)" in held["error"]
        assert unwritable["error"].startswith("cannot write to output directory")
        assert held["quiet"] is unwritable["quiet"] is (rank == 1)  # the error is printed once, by the main process
    assert [s.get("error") for s in main["starts"] + other["starts"]] == [None] * (2 * n)
    assert [s["result"] for s in main["starts"] + other["starts"]] == ["1"] * (2 * n)
    for i in range(n // 2):
        assert [p.name for p in (tmp_path / f"start-{i}" / "checkpoints").iterdir()] == ["checkpoint-000001"]
        assert json.loads((tmp_path / f"start-{i}" / "config.json").read_text())["config"]["overwrite_output_dir"]
