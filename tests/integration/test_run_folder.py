"""The run folder keeps its promises (README "What is guaranteed"): real runs, real faults.

Each test starts from a copy of a real run folder (trained once per module through the real CLI path) and checks
one promise: bad input leaves a finished run byte-identical, --overwrite_output_dir sets the old run aside until
the new one has a checkpoint, resume refuses another experiment, damaged checkpoints and torn metrics lines are
survived, and a second writer is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusers_optim import cli, rundir
from diffusers_optim.checkpoint import CHECKPOINTS_DIR, MANIFEST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_FLAGS, TRAIN_SCRIPT  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
RUN = ["--logging_steps", "1", "--checkpointing_steps", "2"]


def train(*args: str) -> int:
    return cli.main(["train", *TINY_FLAGS, *RUN, *args])


@pytest.fixture(scope="module")
def module_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            mp.delenv(key, raising=False)
        yield


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory, module_env) -> Path:
    """A 6-step run stopped after step 4 (--stop_after_steps), with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train("--output_dir", str(out), "--max_train_steps", "6", "--stop_after_steps", "4") == 0
    return out


@pytest.fixture
def finished(copy_finished_run, tmp_path) -> Path:
    """A complete 4-step run with checkpoints every 2 steps (conftest's real run)."""
    return copy_finished_run(tmp_path / "run")


@pytest.fixture
def stopped(stopped_template, tmp_path) -> Path:
    return Path(shutil.copytree(stopped_template, tmp_path / "run", symlinks=True))


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, hidden ones included."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, code: int, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def steps_of(out: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(out / rundir.METRICS)]


# ---- bad input never changes a byte of an existing run ---------------------------------------------------
RESUME, OVERWRITE = ["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]
ALLOWED = [*RESUME, "--allow_config_change"]  # so a changed data flag reaches the data check
BAD = [
    ("bad number, resume", RESUME, ["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    ("bad number, overwrite", OVERWRITE, ["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    ("bad sampling number, resume", RESUME, ["--num_inference_steps", "0"], "--num_inference_steps must be at least"),
    ("bad sampling number, overwrite", OVERWRITE, ["--num_inference_steps", "0"], "--num_inference_steps must be"),
    ("missing data, resume", ALLOWED, ["--train_data_dir", "/nonexistent"], "--train_data_dir not found"),
    ("missing data, overwrite", OVERWRITE, ["--train_data_dir", "/nonexistent"], "--train_data_dir not found"),
    ("hub offline, resume", RESUME, ["--push_to_hub"], "HF_HUB_OFFLINE is set"),
    ("hub offline, overwrite", OVERWRITE, ["--push_to_hub"], "HF_HUB_OFFLINE is set"),
    ("other optimizer, resume", RESUME, ["--optimizer", "lion"], "optimizer: adamw -> lion"),
    ("EMA turned on, resume", RESUME, ["--use_ema"], "use_ema: False -> True"),
]


@pytest.mark.parametrize("mode, flags, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_leaves_a_finished_run_byte_identical(finished, module_env, capsys, mode, flags, expected):
    before = hashes(finished)
    code = train("--output_dir", str(finished), "--max_train_steps", "4", *mode, *flags)
    one_line_error(capsys, code, expected)
    assert hashes(finished) == before


def test_resuming_a_complete_run_changes_nothing(finished, capsys):
    """A job script that always passes --resume_from_checkpoint latest, run once more after the run completed."""
    before = hashes(finished)
    assert train("--output_dir", str(finished), "--max_train_steps", "4", *RESUME) == 0
    assert hashes(finished) == before
    assert "done: 4 steps, val/loss " in capsys.readouterr().out


def test_a_complete_run_trained_further_is_not_marked_complete_until_it_ends(finished):
    """Extending a finished run (a longer --max_train_steps): run_summary.json is withdrawn before the first new step,
    so a run stopped half-way never reads as complete (compare would skip it, the reports rank its old numbers)."""
    args = ["--output_dir", str(finished), *RESUME]
    assert train(*args, "--max_train_steps", "6", "--stop_after_steps", "5") == 0
    assert not rundir.is_complete(finished) and rundir.run_state(finished) == "resumable"
    assert not (finished / rundir.REWOUND).exists()  # its old summary went with the checkpoint of step 5
    assert train(*args, "--max_train_steps", "6") == 0
    assert rundir.is_complete(finished) and steps_of(finished) == [1, 2, 3, 4, 5, 6]


def test_resume_with_every_checkpoint_damaged_is_an_error_not_a_restart(finished, capsys):
    for checkpoint in (finished / CHECKPOINTS_DIR).glob("checkpoint-*"):
        (checkpoint / "optimizer.bin").write_bytes(b"torn")
    before = hashes(finished)
    code = train("--output_dir", str(finished), "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    one_line_error(capsys, code, "no usable checkpoint", "optimizer.bin has 4 bytes")
    assert hashes(finished) == before


# ---- --overwrite_output_dir: moved aside, deleted only once the new run has a checkpoint --------------------
def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(finished, monkeypatch):
    from diffusers_optim.trainer import Trainer

    before = hashes(finished)
    real_step = Trainer.train_step

    def failing_first_step(self, batches):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(Trainer, "train_step", failing_first_step)
    with pytest.raises(RuntimeError, match="injected"):
        train("--output_dir", str(finished), "--max_train_steps", "4", "--overwrite_output_dir")
    aside = finished / rundir.OVERWRITTEN
    kept = {k: v for k, v in before.items() if not k.startswith(".lock")}
    assert {k: v for k, v in hashes(aside).items()} == kept  # the old run, intact
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert train("--output_dir", str(finished), "--max_train_steps", "4", "--overwrite_output_dir") == 0
    assert not aside.exists() and rundir.is_complete(finished) and steps_of(finished) == [1, 2, 3, 4]


# ---- resume is the same experiment ---------------------------------------------------------------------------
def test_resume_refuses_a_changed_lr_and_allows_it_recorded(stopped, capsys):
    before = hashes(stopped)
    args = ["--output_dir", str(stopped), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    code = train(*args, "--learning_rate", "2e-3", "--optimizer", "lion")
    line = one_line_error(capsys, code, "optimizer: adamw -> lion", "lr: 0.001 -> 0.002", "--allow_config_change")
    assert hashes(stopped) == before, line
    assert train(*args, "--learning_rate", "2e-3", "--allow_config_change") == 0
    config = json.loads((stopped / rundir.CONFIG).read_text())
    assert config["config_changes"] == [{"step": 4, "changes": {"lr": [0.001, 0.002]}}]
    records = {r["step"]: r for r in rundir.read_metrics(stopped / rundir.METRICS)}
    # cosine decay over 6 steps, no warmup: the lr the run trains with is the new peak times the schedule
    assert records[4]["train/lr"] == pytest.approx(0.001 * 0.25)
    assert records[5]["train/lr"] == pytest.approx(0.002 * 0.5 * (1 - 3**0.5 / 2))


def test_use_ema_added_on_resume_with_allow_config_change(stopped):
    args = ["--output_dir", str(stopped), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    assert train(*args, "--use_ema", "--allow_config_change") == 0
    assert rundir.is_complete(stopped) and steps_of(stopped) == [1, 2, 3, 4, 5, 6]


def test_logging_flags_may_change_on_resume(stopped):
    args = ["--output_dir", str(stopped), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    assert train(*args, "--logging_steps", "2", "--num_samples", "2") == 0
    assert rundir.is_complete(stopped)


# ---- damaged checkpoints and torn metrics ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "lr_scheduler.json"])
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous(stopped, caplog, name):
    caplog.set_level(logging.INFO)
    newest = stopped / CHECKPOINTS_DIR / "checkpoint-000004"
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2])
    args = ["--output_dir", str(stopped), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    assert train(*args) == 0
    assert f"skipping damaged checkpoint {newest}: {name} has" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-000002 at step 2" in caplog.text
    assert rundir.is_complete(stopped) and steps_of(stopped) == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_is_skipped_and_reported(stopped, caplog):
    with (stopped / rundir.METRICS).open("a") as f:
        f.write('{"step": 5, "train/lo')  # killed mid-write
    args = ["--output_dir", str(stopped), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    assert train(*args) == 0
    assert "skipping unreadable line 5 of" in caplog.text
    assert steps_of(stopped) == [1, 2, 3, 4, 5, 6]
    assert '"train/lo' not in (stopped / rundir.METRICS).read_text().replace('"train/loss"', "")


def test_checkpoint_manifest_lists_every_file_with_its_size(stopped):
    newest = stopped / CHECKPOINTS_DIR / "checkpoint-000004"
    files = json.loads((newest / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    assert files == on_disk and "trainer_state.json" in files


# ---- one writer at a time --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, module_env, capsys, caplog):
    """A real trainer process holds the folder; an in-process second trainer is refused naming its pid; once the
    holder is SIGKILLed (it cannot clean up), the next run takes over its stale lock."""
    out = tmp_path / "run"
    long_run = ["--output_dir", str(out), "--max_train_steps", "100000", "--checkpointing_steps", "0"]
    holder = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *TINY_FLAGS, *long_run],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not steps_of(out):  # training, so the lock is held
            assert holder.poll() is None, holder.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        code = train(*long_run, "--resume_from_checkpoint", "latest")
        one_line_error(capsys, code, f"is in use by another process (pid {holder.pid}")
        code = train(*long_run, "--overwrite_output_dir")
        one_line_error(capsys, code, f"is in use by another process (pid {holder.pid}")
        assert (out / rundir.METRICS).is_file() and not (out / rundir.OVERWRITTEN).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert rundir.read_json(out / rundir.HOLDER)["pid"] == holder.pid  # left behind by the killed holder
    assert train("--output_dir", str(out), "--max_train_steps", "2", "--overwrite_output_dir") == 0
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert not (out / rundir.HOLDER).exists() and rundir.is_complete(out) and steps_of(out) == [1, 2]


# ---- a comparison killed, then rerun; no secret anywhere ---------------------------------------------------------
COMPARE_FLAGS = [
    "--max_train_steps", "30", "--resolution", "8", "--train_batch_size", "8", "--ddpm_num_steps", "100",
    "--num_validation_images", "8", "--validation_steps", "0", "--logging_steps", "1", "--lr_warmup_steps", "0",
    "--sample_steps", "0", "--num_samples", "4", "--num_inference_steps", "2", "--num_eval_samples", "16",
    "--checkpointing_steps", "10",
]  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead too


@pytest.mark.slow
def test_compare_sigkilled_leaves_no_orphan_reruns_and_never_writes_a_token(tmp_path):
    """The parent of a comparison is SIGKILLed mid-training: its trainer dies with it (after a checkpoint), the
    rerun resumes and finishes, and neither the --hub_token flag nor HF_TOKEN appears in any file."""
    flag_token, env_token = "hf_FLAGTOKENabcdef123456", "hf_ENVTOKENabcdef654321"
    out = tmp_path / "cmp"
    env = {**os.environ, **ENV, "TQDM_DISABLE": "1", "HF_TOKEN": env_token}
    cmd = [sys.executable, "-m", "diffusers_optim.cli", "compare", "--optimizers", "adamw:lr=1e-3", "--seeds", "0",
           "--output_dir", str(out), "--hub_token", flag_token, *COMPARE_FLAGS]
    run_dir = out / "runs" / "adamw-lr0.001-s0"
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(steps_of(run_dir)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the comparison did not start training"
            time.sleep(0.2)
        child = rundir.read_json(run_dir / rundir.HOLDER)["pid"]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 120
    while pid_alive(child):  # PR_SET_PDEATHSIG: the kernel sent it SIGTERM, it saves a checkpoint and exits
        assert time.monotonic() < deadline, f"trainer {child} outlived its comparison"
        time.sleep(0.2)
    log = out / "logs" / "adamw-lr0.001-s0.log"
    assert rundir.run_state(run_dir) == "resumable", log.read_text()[-3000:]

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "--resume_from_checkpoint latest" in log.read_text() and rundir.is_complete(run_dir)
    assert rundir.read_json(out / rundir.FAILURES) == {}
    assert "<redacted>" in rundir.read_json(out / rundir.PLAN)["command"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for token in (flag_token, env_token):
        leaks = [str(p.relative_to(out)) for p in files if token.encode() in p.read_bytes()]
        assert not leaks, f"{token} found in {leaks}"
        assert token not in again.stdout + again.stderr
