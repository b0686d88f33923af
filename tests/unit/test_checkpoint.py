"""Crash-safe checkpoints: round trip, 'latest', total limit, interrupted saves, shape checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from diffusers_optim import checkpoint as ckpt
from diffusers_optim.errors import UserError


class Tiny(nn.Module):
    """A tiny model with a diffusers-like `config`, enough for save_state/load_state."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(3, width)
        self.out = nn.Linear(width, 1)
        self.config = {"in_channels": 3, "out_channels": 1, "block_out_channels": [width], "sample_size": 8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x)))


def build(width: int = 4):
    """Accelerator plus a prepared model, AdamW and an LR schedule."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = Tiny(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(5, 3)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def names(output_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(output_dir)]


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    accelerator, model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 3)
    path = ckpt.save_checkpoint(accelerator, tmp_path, 3, {"data_position": 15, "epoch": 0}, total_limit=None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    lr = scheduler.get_last_lr()
    expected_draw = torch.rand(4)

    train(model, optimizer, scheduler, 2)
    state = ckpt.load_checkpoint(accelerator, path, model.config)

    assert state["step"] == 3 and state["data_position"] == 15 and state["epoch"] == 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key])
    torch.testing.assert_close(optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert scheduler.get_last_lr() == lr
    torch.testing.assert_close(torch.rand(4), expected_draw)
    assert path.name == "checkpoint-000003"
    assert (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint-000003"]


def test_trainer_state_json_holds_step_state_and_model_config(tmp_path):
    accelerator, model, optimizer, scheduler = build()
    path = ckpt.save_checkpoint(accelerator, tmp_path, 7, {"data_position": 3}, total_limit=None)
    data = json.loads((path / "trainer_state.json").read_text())
    assert data == {"step": 7, "data_position": 3, "model_config": model.config}


def test_latest_ignores_tmp_and_incomplete_folders(tmp_path):
    assert ckpt.find_checkpoint(tmp_path, "latest") is None
    accelerator, model, optimizer, scheduler = build()
    good = ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, total_limit=None)
    root = tmp_path / "checkpoints"
    (root / ".tmp-checkpoint-000009").mkdir()
    (root / ".tmp-checkpoint-000009" / "trainer_state.json").write_text("{}")
    (root / "checkpoint-000005").mkdir()
    (root / "checkpoint-000005" / "model.safetensors").write_bytes(b"partial")

    assert ckpt.find_checkpoint(tmp_path, "latest") == good
    assert ckpt.find_checkpoint(tmp_path, str(good)) == good
    assert ckpt.find_checkpoint(tmp_path, "checkpoint-000001") == good
    for spec in (str(root / "checkpoint-000005"), str(root / ".tmp-checkpoint-000009")):
        with pytest.raises(UserError, match="not a complete checkpoint"):
            ckpt.find_checkpoint(tmp_path, spec)
    with pytest.raises(UserError, match="no such folder.*checkpoint-000001"):
        ckpt.find_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_total_limit_keeps_newest_and_deletes_only_after_new_is_complete(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = build()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(accelerator, tmp_path, step, {}, total_limit=2)
    assert names(tmp_path) == ["checkpoint-000002", "checkpoint-000003"]

    seen_during_save = []
    original = accelerator.save_state

    def spying_save_state(*args, **kwargs):
        out = original(*args, **kwargs)
        seen_during_save.append(names(tmp_path))
        return out

    monkeypatch.setattr(accelerator, "save_state", spying_save_state)
    ckpt.save_checkpoint(accelerator, tmp_path, 4, {}, total_limit=2)
    assert seen_during_save == [["checkpoint-000002", "checkpoint-000003"]]
    assert names(tmp_path) == ["checkpoint-000003", "checkpoint-000004"]


def test_manifest_is_written_last_and_a_resized_file_makes_the_checkpoint_damaged(tmp_path):
    accelerator, *_ = build()
    first = ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, total_limit=None)
    second = ckpt.save_checkpoint(accelerator, tmp_path, 2, {}, total_limit=None)
    manifest = json.loads((second / ckpt.MANIFEST).read_text())["files"]
    assert {"model.safetensors", "trainer_state.json"} <= set(manifest)
    assert ckpt.damage(second) is None
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model.safetensors has" in ckpt.damage(second)
    assert ckpt.find_checkpoint(tmp_path, "latest") == first  # the newest intact one
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find_checkpoint(tmp_path, str(second))
    (first / ckpt.MANIFEST).unlink()
    with pytest.raises(UserError, match="no usable checkpoint"):
        ckpt.find_checkpoint(tmp_path, "latest")


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = build()
    first = ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, total_limit=1)

    def crashing_save_state(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(accelerator, "save_state", crashing_save_state)
        with pytest.raises(RuntimeError, match="disk full"):
            ckpt.save_checkpoint(accelerator, tmp_path, 2, {}, total_limit=1)
    assert ckpt.find_checkpoint(tmp_path, "latest") == first
    assert not (tmp_path / "checkpoints" / "checkpoint-000002").exists()
    assert names(tmp_path) == ["checkpoint-000001"]

    ckpt.save_checkpoint(accelerator, tmp_path, 3, {}, total_limit=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-000003"]


def test_saving_same_step_twice_replaces_it(tmp_path):
    accelerator, model, optimizer, scheduler = build()
    ckpt.save_checkpoint(accelerator, tmp_path, 5, {"data_position": 1}, total_limit=None)
    path = ckpt.save_checkpoint(accelerator, tmp_path, 5, {"data_position": 2}, total_limit=None)
    assert ckpt.read_trainer_state(path)["data_position"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint-000005"]


def test_shape_mismatch_is_a_user_error_before_loading(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = build()
    path = ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, total_limit=None)
    monkeypatch.setattr(accelerator, "load_state", lambda *a, **k: pytest.fail("load_state must not run"))
    other = dict(model.config, block_out_channels=[8])
    with pytest.raises(
        UserError, match=r"different model shape \(block_out_channels: saved \[4\], now \[8\]\)"
    ):
        ckpt.load_checkpoint(accelerator, path, other)


def test_unet_config_is_recorded_and_checked(tmp_path):
    from diffusers_optim.models import build_unet

    accelerator = Accelerator(cpu=True)
    unet = accelerator.prepare(build_unet("tiny", resolution=8))
    path = ckpt.save_checkpoint(accelerator, tmp_path, 1, {}, total_limit=None)
    assert ckpt.read_trainer_state(path)["model_config"]["block_out_channels"] == [16, 32]
    ckpt.load_checkpoint(accelerator, path, unet.config)  # same shape: loads
    with pytest.raises(UserError, match="sample_size: saved 8, now 16"):
        ckpt.load_checkpoint(accelerator, path, build_unet("tiny", resolution=16).config)


def test_load_of_incomplete_folder_is_a_user_error(tmp_path):
    accelerator, *_ = build()
    (tmp_path / "checkpoint-000001").mkdir()
    with pytest.raises(UserError, match="incomplete"):
        ckpt.load_checkpoint(accelerator, tmp_path / "checkpoint-000001", {})


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from accelerate import Accelerator
    from diffusers_optim import checkpoint as ckpt

    out, kill_at = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    ckpt.save_checkpoint(accelerator, out, 1, {}, total_limit=1)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "save_state":
        real = accelerator.save_state
        accelerator.save_state = lambda d, **kw: (real(d, **kw), die())
    else:
        ckpt.os.replace = die
    ckpt.save_checkpoint(accelerator, out, 2, {}, total_limit=1)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("kill_at", ["save_state", "rename"])
def test_sigkill_during_save_leaves_previous_checkpoint_latest(tmp_path, kill_at):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), kill_at], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (out / "checkpoints" / ".tmp-checkpoint-000002").is_dir()  # the interrupted save got that far
    assert ckpt.find_checkpoint(out, "latest") == out / "checkpoints" / "checkpoint-000001"
    assert names(out) == ["checkpoint-000001"]
