"""The real training script under SIGKILL (mid-step, mid-save) and SIGTERM, then resumed; and no secret in any output."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train_scripts" / "train_unconditional.py"
TIMEOUT = 300

# Runs the real script, after arranging for the process to SIGKILL itself at a deterministic point:
# CRASH_AT=step:N  inside the forward pass of step N (0-based);  CRASH_AT=save:N  inside the N-th (1-based)
# accelerator.save_state, after the weights file is written, as the optimizer state is about to be.
LAUNCHER = """
import os, runpy, signal, sys
from diffusers_optim.trainer import Trainer

kind, n = os.environ["CRASH_AT"].split(":")
n = int(n)
if kind == "step":
    compute_loss = Trainer.compute_loss
    def crashing_loss(self, *args):
        if self.step == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return compute_loss(self, *args)
    Trainer.compute_loss = crashing_loss
else:
    import accelerate.checkpointing as ckpt_mod
    save, calls = ckpt_mod.save, []
    def crashing_save(obj, path, *args, **kwargs):
        if str(path).endswith("model.safetensors"):
            calls.append(path)
        if len(calls) == n and str(path).endswith("optimizer.bin"):
            os.kill(os.getpid(), signal.SIGKILL)  # the weights are on disk, the optimizer state is not
        return save(obj, path, *args, **kwargs)
    ckpt_mod.save = crashing_save
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def run_flags(tiny_flags, tmp_path) -> list[str]:
    return [
        *tiny_flags,
        "--output_dir",
        str(tmp_path / "run"),
        "--max_train_steps",
        "8",
        "--logging_steps",
        "1",
        "--checkpointing_steps",
        "2",
    ]


def run(args: list[str], env: dict[str, str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    if crash_at is None:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-c", LAUNCHER, str(SCRIPT), *args]
        env = {**env, "CRASH_AT": crash_at}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def metric_steps(out: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def resume_and_finish(run_flags: list[str], env: dict[str, str], out: Path, expect_from: int) -> None:
    proc = run([*run_flags, "--resume_from_checkpoint", "latest"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"\b{expect_from}/8 \[00:00<\?", proc.stderr), proc.stderr  # the bar starts there
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 8
    assert metric_steps(out) == list(range(1, 9))  # strictly increasing, no duplicates, none missing
    assert not [name for name in checkpoint_names(out) if name.startswith(".")]


@pytest.mark.slow
def test_sigkill_during_a_step_then_resume_latest(run_flags, offline_env, tmp_path):
    out = tmp_path / "run"
    proc = run(run_flags, offline_env, crash_at="step:5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_names(out) == ["checkpoint-000002", "checkpoint-000004"]
    assert metric_steps(out) == [1, 2, 3, 4, 5]
    resume_and_finish(run_flags, offline_env, out, expect_from=4)


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_latest(run_flags, offline_env, tmp_path):
    out = tmp_path / "run"
    proc = run(run_flags, offline_env, crash_at="save:2")  # the save of step 4
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The interrupted save is only a hidden temporary folder: 'latest' cannot mistake it for a checkpoint.
    assert checkpoint_names(out) == [".tmp-checkpoint-000004", "checkpoint-000002"]
    partial = out / "checkpoints" / ".tmp-checkpoint-000004"
    assert (partial / "model.safetensors").is_file() and not (partial / "optimizer.bin").exists()
    resume_and_finish(run_flags, offline_env, out, expect_from=2)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(tiny_flags, offline_env, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_flags, "--output_dir", str(out), "--max_train_steps", "100000", "--logging_steps", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=offline_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "metrics.jsonl").is_file() and len(metric_steps(out)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "interrupted (SIGTERM) after step" in stderr and "--resume_from_checkpoint latest" in stderr
    (name,) = checkpoint_names(out)
    step = json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())["step"]
    assert step >= 2 and name == f"checkpoint-{step:06d}", stderr[-3000:]
    assert not (out / "run_summary.json").exists()


@pytest.mark.slow
def test_secrets_never_reach_outputs_logs_or_trackers(tiny_flags, offline_env, tmp_path):
    """--hub_token and WANDB_API_KEY (fake) appear nowhere: output files, W&B run, stdout/stderr, model card."""
    hub_secret, wandb_secret = "hf_FAKESECRET123", "FAKEWANDBKEY0123456789abcdef0123456789abcd"
    out = tmp_path / "run"
    env = {**offline_env, "WANDB_API_KEY": wandb_secret, "WANDB_MODE": "offline"}
    args = [
        *tiny_flags,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--logging_steps",
        "1",
        "--checkpointing_steps",
        "1",
        "--report_to",
        "wandb",
        "--hub_token",
        hub_secret,
    ]
    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    leet = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout
    assert '"hub_token"' in leet  # the config did reach W&B (redacted), so the check below means something
    texts = {"stdout": proc.stdout, "stderr": proc.stderr, "wandb leet": leet}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    texts.update({str(p.relative_to(out)): p.read_bytes().decode("latin-1") for p in files})
    for secret in (hub_secret, wandb_secret):
        leaks = [name for name, text in texts.items() if secret in text]
        assert not leaks, f"{secret} found in {leaks}"
    assert json.loads((out / "config.json").read_text())["config"]["hub_token"] == "<redacted>"

    # Checkpoints hold no pickled objects that accelerate would load with weights_only=False.
    assert not list(out.glob("checkpoints/*/custom_checkpoint_*.pkl"))


def test_model_card_holds_no_token(tiny_config, offline_env, monkeypatch):
    from diffusers_optim.hub import build_model_card, run_card_info
    from diffusers_optim.trainer import Trainer

    secret = "hf_FAKESECRET123"
    monkeypatch.setattr(sys, "argv", ["train_unconditional.py", "--hub_token", secret])
    trainer = Trainer(tiny_config("--hub_token", secret, "--max_train_steps", "1"))
    assert trainer.cfg.hub_token == secret  # the trainer does hold it (to upload), so the card could leak it
    trainer.train()
    card = str(build_model_card(run_card_info(trainer.out)))  # the card the upload would send
    assert "adamw" in card and "val/loss" in card and secret not in card
    assert secret not in json.dumps(trainer.run_config())
