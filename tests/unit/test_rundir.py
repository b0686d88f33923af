"""rundir: tolerant readers, atomic writers, move-aside, lock (the trainer-level promises: tests/integration/test_run_folder.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffusers_optim import rundir
from diffusers_optim.errors import UserError


def test_torn_lines_are_skipped_and_reported_and_truncation_drops_them(tmp_path, caplog):
    path = tmp_path / rundir.METRICS
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2]
    assert "skipping unreadable line 3" in caplog.text
    rundir.truncate_metrics(path, 1)
    assert path.read_text() == json.dumps({"step": 1, "a": 1}) + "\n"


def test_write_json_replaces_atomically_and_read_json_tolerates_garbage(tmp_path):
    path = tmp_path / "x.json"
    rundir.write_json(path, {"a": 1})
    assert rundir.read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    path.write_text('{"a": ')
    assert rundir.read_json(path) == {} and rundir.read_json(tmp_path / "missing.json") == {}


def test_move_aside_keeps_the_first_replaced_run(tmp_path):
    (tmp_path / rundir.METRICS).write_text("old\n")
    (tmp_path / "my_notes.txt").write_text("not a run file")
    assert rundir.move_aside(tmp_path) == tmp_path / rundir.OVERWRITTEN
    assert (tmp_path / rundir.OVERWRITTEN / rundir.METRICS).read_text() == "old\n"
    assert (tmp_path / "my_notes.txt").exists()  # only the run's own files move
    (tmp_path / rundir.METRICS).write_text("interrupted replacement\n")
    rundir.move_aside(tmp_path)  # the replacement died before a checkpoint: the old run stays set aside
    assert (tmp_path / rundir.OVERWRITTEN / rundir.METRICS).read_text() == "old\n"
    assert not (tmp_path / rundir.METRICS).exists()
    rundir.drop_overwritten(tmp_path)
    assert not (tmp_path / rundir.OVERWRITTEN).exists()


def test_lock_names_its_holder_and_is_taken_over_from_a_dead_one(tmp_path, caplog):
    with rundir.locked(tmp_path):
        assert rundir.lock_holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by another process \\(pid {os.getpid()}"):
            rundir.RunLock(tmp_path).acquire()
    assert rundir.lock_holder(tmp_path) is None and not (tmp_path / rundir.HOLDER).exists()
    # a holder killed without cleanup: the kernel dropped its flock, its holder file remains
    code = f"from diffusers_optim import rundir; import os; rundir.RunLock({str(tmp_path)!r}).acquire(); os._exit(0)"
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ}, check=True)
    assert dead.returncode == 0 and rundir.read_json(tmp_path / rundir.HOLDER)["pid"] != os.getpid()
    assert rundir.run_state(tmp_path) == "empty"
    with rundir.locked(tmp_path):
        assert "taking over the lock of pid" in caplog.text
