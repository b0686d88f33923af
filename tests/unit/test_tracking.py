"""Tracking helpers: W&B offline fallback, config flattening, metrics.jsonl truncation on resume."""

from __future__ import annotations

import json
import logging

import pytest

from diffusers_optim import tracking
from diffusers_optim.errors import UserError


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))


def test_no_login_means_offline_with_one_notice(no_login, monkeypatch, caplog):
    from accelerate.state import PartialState

    PartialState()  # accelerate's logger needs its state
    with caplog.at_level(logging.WARNING):
        assert tracking.ensure_wandb_mode() == "offline"
    assert tracking.os.environ["WANDB_MODE"] == "offline"
    notices = [r for r in caplog.records if "offline" in r.getMessage()]
    assert len(notices) == 1 and "wandb sync" in notices[0].getMessage()


def test_an_api_key_keeps_online_mode(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.ensure_wandb_mode() == "online"
    assert "WANDB_MODE" not in tracking.os.environ


def test_an_explicit_mode_is_respected(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.ensure_wandb_mode() == "disabled"


def test_netrc_login_counts(no_login, monkeypatch, tmp_path):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking.wandb_has_credentials()


def test_flatten_config_nests_with_slashes_and_stringifies_lists():
    flat = tracking.flatten_config({"optimizer": "lion", "spec": {"betas": [0.9, 0.99], "wd": None}, "lr": 1e-4})
    assert flat == {"optimizer": "lion", "spec/betas": "[0.9, 0.99]", "spec/wd": "None", "lr": 1e-4}


def test_unknown_report_to_lists_the_valid_values():
    with pytest.raises(UserError, match="Did you mean 'wandb'"):
        tracking.resolve_trackers("wandbb")
    assert tracking.resolve_trackers("all") == ["wandb", "tensorboard"]


def test_run_id_is_stable_across_resumes(tmp_path):
    first = tracking.wandb_run_id(tmp_path)
    assert tracking.wandb_run_id(tmp_path) == first and first.isalnum()


def test_truncate_after_drops_records_past_the_checkpoint(tmp_path):
    from accelerate import Accelerator

    log = tracking.MetricsLog(Accelerator(cpu=True), tmp_path, [])
    for step in (2, 4, 6, 8):
        log.log({"train/loss": step / 10, "val/loss": float("nan")}, step)
    log.truncate_after(4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert lines[0]["val/loss"] is None  # NaN is stored as null, which JSON can hold


def test_check_writable_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to output directory"):
        tracking.check_writable(blocker / "run")
