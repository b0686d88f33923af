"""The gradient probes through the real Trainer: they change nothing in training, and log every grad_t/ key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_optim.metrics.probes import ProbeKeys
from diffusers_optim.trainer import Trainer


@pytest.fixture(autouse=True)
def _offline(offline_env):
    pass


def train(tiny_config, name: str, optimizer: str, *flags: str) -> tuple[Trainer, list[dict]]:
    cfg = tiny_config("--max_train_steps", "4", "--logging_steps", "2", "--use_ema", "--gradient_accumulation_steps",
                      "2", "--train_batch_size", "4", "--optimizer", optimizer, *flags)
    cfg.output_dir = str(Path(cfg.output_dir).parent / name)
    trainer = Trainer(cfg)
    trainer.train()
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return trainer, lines


def optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.optimizer.state_dict()["state"]
    return [v for s in state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_schedulefree"])
def test_probes_on_every_step_leave_training_bit_identical(tiny_config, optimizer):
    # SGD with momentum: the probes read its momentum buffer. Schedule-free: its train/eval weight modes must be
    # left alone (it has no first-moment buffer). EMA and gradient accumulation are on.
    from diffusers_optim.optim import get_spec

    if not get_spec(optimizer).is_available():
        pytest.skip(f"{optimizer} is not installed")
    off, lines_off = train(tiny_config, "off", optimizer, "--grad_probe_steps", "0")
    rng_off = torch.get_rng_state()
    on, lines_on = train(tiny_config, "on", optimizer, "--grad_probe_steps", "1")
    rng_on = torch.get_rng_state()

    for a, b in zip(off.model.parameters(), on.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(off.ema.shadow_params, on.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimizer_tensors(off), optimizer_tensors(on), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_off, rng_on)  # no draw from the global RNG stream
    assert all(p.grad is None for p in on.model.parameters())

    def training_keys(lines):
        return [{k: v for k, v in r.items() if not k.startswith(("grad_t/", "perf/", "elapsed"))} for r in lines]

    steps_on = [r["step"] for r in lines_on]
    assert steps_on == [1, 2, 3, 4]  # probe records at every step; log steps at 2 and 4
    assert training_keys([r for r in lines_on if r["step"] in (2, 4)]) == training_keys(lines_off)
    keys = ProbeKeys(1000, 4)
    expected = {*keys.norm, *keys.cos, *keys.update_cos, "grad_t/cos_mean", "grad_t/full_norm",
                "grad_t/full_update_cos"}
    for r in lines_on:
        assert expected <= set(r), expected - set(r)
        assert all(-1 <= r[k] <= 1 for k in [*keys.cos, *keys.update_cos])
    if optimizer == "sgd":  # its momentum buffer exists from the second step on: cos(g, m) is logged from then
        assert "grad_t/full_momentum_cos" not in lines_on[0]
        assert all(set(keys.momentum_cos) <= set(r) for r in lines_on[1:])
    else:
        assert not any("momentum" in k for r in lines_on for k in r)
    assert all(not any(k.startswith("grad_t/") for k in r) for r in lines_off)


def test_negative_probe_cadence_is_a_user_error(tiny_config):
    from diffusers_optim.errors import UserError

    with pytest.raises(UserError, match="--grad_probe_steps must be 0"):
        Trainer(tiny_config("--grad_probe_steps", "-1"))
