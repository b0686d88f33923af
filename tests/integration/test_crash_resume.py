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
# accelerator.save_state, after the weights file is written, as the optimizer state is about to be;
# CRASH_AT=rewind:N  as a resume from an older checkpoint sets the N-th (1-based) file of the later timeline aside.
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
elif kind == "rewind":
    from diffusers_optim import rundir
    set_aside, moves = rundir._set_aside, []
    def crashing_set_aside(path, dest):
        moves.append(path)
        if len(moves) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return set_aside(path, dest)
    rundir._set_aside = crashing_set_aside
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


def unet_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    (weights,) = [p for p in folder.rglob("*.safetensors") if "ema" not in p.parts[-2]]
    return load_file(weights)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def curves(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock keys, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("perf/", "elapsed"))}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# the flags of conftest's finished run (4 steps, checkpoints at 2 and 4), rewound with another lr
REWOUND_FLAGS = ["--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "2",
                 "--learning_rate", "3e-4", "--allow_config_change"]


@pytest.mark.slow
def test_rewind_killed_then_latest_resumes_the_rewound_timeline(copy_finished_run, tiny_flags, offline_env, tmp_path):
    """A complete 4-step run is rewound to checkpoint 2 with a new lr, SIGKILLed in step 3, then resumed with
    `latest`: it continues the rewound timeline (never the abandoned checkpoint 4), the folder is not marked
    complete in between, and the result is the unbroken rewound run's, bit for bit."""
    from diffusers_optim import cli

    flags = [*tiny_flags, *REWOUND_FLAGS]
    unbroken, broken = copy_finished_run(tmp_path / "unbroken"), copy_finished_run(tmp_path / "broken")
    abandoned = unet_weights(broken / "checkpoints" / "checkpoint-000004")
    rewind = ["--resume_from_checkpoint", str(unbroken / "checkpoints" / "checkpoint-000002")]
    assert cli.main(["train", *flags, "--output_dir", str(unbroken), *rewind]) == 0

    rewind = ["--resume_from_checkpoint", str(broken / "checkpoints" / "checkpoint-000002")]
    proc = run([*flags, "--output_dir", str(broken), *rewind], offline_env, crash_at="step:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    aside = broken / ".rewound"
    moved = "run_summary.json, model_index.json, unet, scheduler, checkpoint-000004, samples/step_000004.png"
    assert f"resuming at step 2: {moved} moved to {aside}, deleted when" in proc.stderr, proc.stderr
    assert not (broken / "run_summary.json").exists()  # no longer complete: compare and `latest` see it unfinished
    assert not (broken / "model_index.json").exists() and (aside / "unet").is_dir()  # no abandoned pipeline on top
    assert checkpoint_names(broken) == ["checkpoint-000002"] and metric_steps(broken) == [1, 2]
    assert (aside / "run_summary.json").is_file() and metric_steps(aside) == [1, 2, 3, 4]

    proc = run([*flags, "--output_dir", str(broken), "--resume_from_checkpoint", "latest"], offline_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\b2/4 \[00:00<\?", proc.stderr), proc.stderr  # from checkpoint 2, not the abandoned 4
    assert json.loads((broken / "run_summary.json").read_text())["steps"] == 4 and not aside.exists()
    assert curves(broken) == curves(unbroken) and metric_steps(broken) == [1, 2, 3, 4]
    final = unet_weights(broken / "unet")
    assert same_weights(final, unet_weights(unbroken / "unet"))
    assert same_weights(unet_weights(broken / "checkpoints" / "checkpoint-000004"), final)
    assert not same_weights(final, abandoned)  # the new lr made another timeline: mixing them would show


@pytest.mark.slow
def test_rewind_killed_while_setting_the_old_timeline_aside(copy_finished_run, tiny_flags, offline_env, tmp_path):
    """SIGKILL between two moves of a rewind (run_summary.json aside; the final pipeline and checkpoint 4 still in
    place): `latest` still resumes the rewound timeline at step 2, and that resume finishes setting the old one
    aside."""
    out = copy_finished_run(tmp_path / "run")
    flags = [*tiny_flags, *REWOUND_FLAGS, "--output_dir", str(out)]
    proc = run([*flags, "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-000002")], offline_env,
               crash_at="rewind:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_names(out) == ["checkpoint-000002", "checkpoint-000004"]  # the abandoned 4 is still there
    assert not (out / "run_summary.json").exists()
    proc = run([*flags, "--resume_from_checkpoint", "latest"], offline_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\b2/4 \[00:00<\?", proc.stderr), proc.stderr
    moved = "model_index.json, unet, scheduler, checkpoint-000004, samples/step_000004.png"
    assert f"resuming at step 2: {moved} moved to" in proc.stderr
    assert metric_steps(out) == [1, 2, 3, 4] and not (out / ".rewound").exists()
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 4


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
