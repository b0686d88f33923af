"""A step whose loss or gradients are not finite changes nothing, is counted, and too many in a row stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_optim import cli
from diffusers_optim.checkpoint import list_checkpoints, read_trainer_state
from diffusers_optim.trainer import Trainer, TrainingStopped

# torch's warning when the very first optimizer step is the skipped one: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")


@pytest.fixture(autouse=True)
def _setup(offline_env):
    torch.set_num_threads(1)


def poison_loss(monkeypatch, bad_steps) -> None:
    """Multiply the loss by NaN on the given (0-based) steps, as a diverging run would."""
    original = Trainer.compute_loss

    def compute_loss(self, clean, noise, timesteps):
        mse, loss = original(self, clean, noise, timesteps)
        return mse, loss * float("nan") if self.step in bad_steps else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def clone_state(trainer: Trainer) -> dict[str, dict]:
    """Deep copies of the weights, the optimizer state and the EMA weights."""

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return {
        "model": copy(trainer.model.state_dict()),
        "optimizer": copy(trainer.optimizer.state_dict()["state"]),
        "ema": copy(list(trainer.ema.shadow_params)),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def record_each_step(monkeypatch) -> list[tuple[int, dict, dict]]:
    """(step, state before, state after) around every optimizer step."""
    records = []
    original = Trainer.optimizer_step

    def optimizer_step(self, grad_norm):
        before = clone_state(self)
        try:
            original(self, grad_norm)
        finally:
            records.append((self.step, before, clone_state(self)))

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    return records


def test_nonfinite_step_changes_nothing_and_is_counted(tiny_config, monkeypatch):
    poison_loss(monkeypatch, bad_steps={2})
    records = record_each_step(monkeypatch)
    trainer = Trainer(tiny_config("--use_ema", "--logging_steps", "2", "--max_train_steps", "5"))
    summary = trainer.train()

    assert summary["status"] == "complete" and summary["steps"] == 5 and summary["nonfinite_steps"] == 1
    changed = {step: not same(before, after) for step, before, after in records}
    assert changed == {
        0: True,
        1: True,
        2: False,
        3: True,
        4: True,
    }  # only the NaN step left everything as it was
    assert records[2][1]["optimizer"], "the optimizer had state to protect by step 2"
    lines = [json.loads(x) for x in (Path(trainer.out) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/nonfinite_steps"]) for r in lines if "train/nonfinite_steps" in r] == [
        (2, 0),
        (4, 1),
        (5, 1),
    ]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # the skipped step (index 2, logged at step 4) does not turn its interval's curves into NaN
    interval = next(r for r in lines if r["step"] == 4)
    assert interval["train/loss"] is not None and interval["train/grad_norm"] is not None
    assert sum(v for k, v in interval.items() if k.startswith("count_t/")) == 8  # only the applied step's batch


def test_too_many_nonfinite_steps_stop_with_a_complete_checkpoint(tiny_config, monkeypatch):
    poison_loss(monkeypatch, bad_steps=set(range(1, 100)))
    cfg = tiny_config("--max_nonfinite_steps", "3", "--max_train_steps", "10", "--logging_steps", "1")
    trainer = Trainer(cfg)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        trainer.train()

    (checkpoint,) = list_checkpoints(Path(cfg.output_dir))
    state = read_trainer_state(checkpoint)
    assert state["nonfinite_total"] == 3
    # The checkpoint's step, its LR schedule and the data position agree, so a resume continues the same run.
    assert state["step"] == 4 == json.loads((checkpoint / "lr_scheduler.json").read_text())["last_epoch"]
    assert {"model.safetensors", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not (Path(cfg.output_dir) / "run_summary.json").exists()


def test_cli_reports_a_diverged_run_in_one_line(tiny_flags, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, bad_steps=set(range(100)))
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            *tiny_flags,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "10",
            "--max_nonfinite_steps",
            "2",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert err == [
        "error: 2 non-finite steps in a row at step 2: the run diverged. A checkpoint was saved; "
        "lower --learning_rate or set --max_grad_norm and resume."
    ]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002"]
