"""Messages that help: unknown flags answered by meaning, honest --help, loud resume, phases announced, no noise."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffusers_optim import cli, trainer
from diffusers_optim.config import field_types

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_train(capsys, tiny_flags, offline_env):
    """`diffusers-optim train` in this process with the tiny flags: returns (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["train", *tiny_flags, "--max_train_steps", "2", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    "flag, hint",
    [
        # other trainers' names (every flag of diffusers' train_unconditional.py is a real flag or an alias)
        ("--lr", "Did you mean --learning_rate?"),
        ("--batch_size", "Did you mean --train_batch_size"),
        ("--weight_decay", "Did you mean --adam_weight_decay"),
        # a plain typo still gets the closest spelling
        ("--learnig_rate", "Did you mean --learning_rate?"),
    ],
)
def test_unknown_flags_are_answered_by_meaning(run_train, tmp_path, flag, hint):
    if flag.lstrip("-") in field_types():
        pytest.skip(f"{flag} is a real flag now")
    code, _, err = run_train("--output_dir", str(tmp_path / "run"), flag, "3")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: unknown flag {flag}.") and hint in lines[0], lines[0]
    assert "--num_epochs" not in lines[0] and "--train_batch_size?" not in lines[0].replace(hint, "")
    assert not (tmp_path / "run").exists()


def test_compare_passes_the_same_hint_for_training_flags(tmp_path):
    from diffusers_optim import compare
    from diffusers_optim.errors import UserError

    with pytest.raises(UserError, match=r"--batch_size\. .*--train_batch_size"):
        compare.parse_comparison(["--optimizers", "adamw", "--output_dir", str(tmp_path), "--batch_size", "5"])


def test_help_states_each_default_once_and_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: diffusers-optim train ")
    assert "(default: None)" not in text
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    # a statement of the default is "default: X"; the bare word can be a choice (--compile_mode {default,...})
    twice = [o.split()[0] for o in options if len(re.findall(r"default:", o, re.IGNORECASE)) > 1]
    assert not twice, twice
    learning_rate = next(o for o in options if o.startswith("--learning_rate"))
    assert "default: the optimizer's own" in learning_rate
    assert "(default: 500)" in next(o for o in options if o.startswith("--max_train_steps"))


def test_script_help_names_the_script(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train_scripts" / "train_unconditional.py"), "--help"])
    with pytest.raises(SystemExit):
        cli.run_main(trainer.main, ["--help"])
    assert capsys.readouterr().out.startswith("usage: train_unconditional.py ")


def test_resume_latest_into_a_missing_folder_is_an_error(run_train, tmp_path):
    missing = tmp_path / "typo" / "run"
    code, _, err = run_train("--output_dir", str(missing), "--resume_from_checkpoint", "latest")
    assert code == 2, err
    assert err.strip().startswith("error: --resume_from_checkpoint latest:") and "does not exist" in err
    assert "--resume_from_checkpoint auto" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_resume_latest_without_a_checkpoint_warns_loudly(run_train, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    with caplog.at_level(logging.WARNING):
        code, stdout, _ = run_train("--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert code == 0 and "done: 2 steps" in stdout
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("WARNING: --resume_from_checkpoint latest found no checkpoint" in w and "step 0" in w
               for w in warnings), warnings


def test_resume_auto_starts_a_new_run_then_resumes_it(run_train, tmp_path):
    out = tmp_path / "new" / "run"
    code, _, err = run_train("--output_dir", str(out), "--resume_from_checkpoint", "auto",
                             "--stop_after_steps", "1")
    assert code == 0, err
    assert "starting a new run" in err
    code, _, err = run_train("--output_dir", str(out), "--resume_from_checkpoint", "auto")
    assert code == 0 and "resumed from" in err and "at step 1" in err, err
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2


def test_muon_logs_each_routed_groups_own_lr(run_train, tmp_path):
    pytest.importorskip("pytorch_optimizer")
    out = tmp_path / "run"
    code, _, err = run_train("--output_dir", str(out), "--optimizer", "muon", "--learning_rate", "0.02",
                             "--lr_scheduler", "constant", "--logging_steps", "1")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/lr" in r]
    assert logged
    for record in logged:
        assert record["train/lr"] == pytest.approx(0.02)  # the Muon group's lr, which the run is named after
        assert record["train/lr/muon"] == pytest.approx(0.02)
        assert record["train/lr/adamw"] == pytest.approx(3e-4)  # its AdamW fallback, under its own key
    assert "lr=2.00e-02" in err  # the progress bar shows the Muon lr too


def test_adamw_logs_one_lr(run_train, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_train("--output_dir", str(out), "--lr_scheduler", "constant", "--logging_steps", "1")
    assert code == 0, err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train/lr"] == pytest.approx(1e-3) and not [k for k in record if k.startswith("train/lr/")]


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi (no network here): answers whoami, create_repo and upload_folder."""

    def __init__(self, *args, **kwargs):
        pass

    def whoami(self, token=None):
        return {"name": "alice"}

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        return SimpleNamespace(repo_url=f"https://huggingface.co/{kwargs['repo_id']}")


def test_slow_phases_say_what_they_do_and_how_long_they_took(run_train, tmp_path, monkeypatch):
    from diffusers_optim import hub

    monkeypatch.setattr(hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    out = tmp_path / "run"
    code, _, err = run_train("--output_dir", str(out), "--checkpointing_steps", "1", "--push_to_hub",
                             "--hub_model_id", "alice/phases", "--hub_token", "hf_notreal")
    assert code == 0, err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip()]
    expected = [
        ("[step 1] checkpoint writing: ", "checkpoint-000001 ...", "[step 1] checkpoint writing done in "),
        ("[step 2] quality evaluation: ", "8 samples x 2 DDPM steps ...", "[step 2] quality evaluation done in "),
        ("[step 2] final sampling: ", "4 images x 2 DDPM steps ...", "[step 2] final sampling done in "),
        ("pipeline writing: ", str(out), "pipeline writing done in "),
        ("Hub upload: ", "to alice/phases ...", "Hub upload done in "),
    ]
    for start, detail, done in expected:
        begin = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
        assert begin is not None and detail in lines[begin], (start, lines)
        assert any(re.match(re.escape(done) + r"\d+\.\d s$", line) for line in lines[begin + 1:]), (done, lines)
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "done" and status["step"] == status["max_steps"] == 2


NOISE = (
    "gemm_4bit_forward",  # bitsandbytes' CPU kernel notice at import
    "Data has no positive values",  # matplotlib on a log axis with nothing to show
    "were not passed to `accelerate launch`",  # accelerate's missing-config warning
    "[RANK 0]",
)


@pytest.mark.slow
def test_a_real_run_prints_no_third_party_noise(tmp_path, tiny_flags, offline_env):
    """The README's one-process launch: no accelerate config warning, no bitsandbytes notice, phases shown."""
    readme = (ROOT / "README.md").read_text()
    launch = re.search(r"^accelerate launch (.*?)train_scripts/train_unconditional\.py", readme, re.MULTILINE)
    assert launch, "README shows an `accelerate launch ... train_scripts/train_unconditional.py` command"
    env = {**offline_env, "PYTHONPATH": str(ROOT) + os.pathsep + offline_env.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *shlex.split(launch.group(1)),
           str(ROOT / "train_scripts" / "train_unconditional.py"), *tiny_flags, "--max_train_steps", "2",
           "--optimizer", "adamw_8bit", "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "final sampling done in" in output
    for noise in NOISE:
        assert noise not in output, (noise, output[-3000:])
