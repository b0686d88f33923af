"""LR schedules: diffusers' schedulers equal the pure lr_factor at every step."""

import math

import pytest
import torch

from diffusers_optim.errors import UserError
from diffusers_optim.schedules import (
    LR_SCHEDULERS,
    build_lr_scheduler,
    default_warmup_steps,
    lr_factor,
    resolve_lr_scheduler,
)

LR = 0.01


def _lrs(name, warmup, total, num_cycles=0.5):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_lr_scheduler(name, opt, warmup, total, num_cycles)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(10, 100), (0, 50), (1, 7)])
def test_scheduler_equals_closed_form(name, warmup, total):
    lrs = _lrs(name, warmup, total)
    expected = [LR * lr_factor(s, name, warmup, total) for s in range(total + 1)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_cosine_num_cycles_is_honoured():
    lrs = _lrs("cosine", 0, 40, num_cycles=1.0)
    expected = [LR * lr_factor(s, "cosine", 0, 40, 1.0) for s in range(41)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12) and lrs[40] == pytest.approx(LR)


def test_shapes_warmup_peak_and_end():
    warmup, total = 10, 100
    for name in ("constant", "linear", "cosine"):
        f = [lr_factor(s, name, warmup, total) for s in range(total + 1)]
        assert f[: warmup + 1] == pytest.approx([s / warmup for s in range(warmup + 1)])
        assert max(f) == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0)
    assert lr_factor(total, "linear", warmup, total) == 0.0
    assert lr_factor(total, "cosine", warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total, "constant", warmup, total) == 1.0
    mid = (warmup + total) // 2
    assert lr_factor(mid, "cosine", warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(mid, "linear", warmup, total) == pytest.approx(0.5)


def test_constant_without_warmup_is_flat():
    assert set(_lrs("constant", 0, 20)) == {LR}


@pytest.mark.parametrize("name", ["cosine_with_restarts", "polynomial"])
def test_other_diffusers_schedules_build_and_decay(name):
    lrs = _lrs(name, 5, 50, num_cycles=2)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(LR)
    assert lrs[-1] < LR * 0.01


def test_unknown_name_lists_valid_ones():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(UserError) as err:
        build_lr_scheduler("cosin", opt, 0, 10)
    message = str(err.value)
    assert "Did you mean 'cosine'" in message
    assert all(name in message for name in LR_SCHEDULERS)
    with pytest.raises(UserError, match="lr_scheduler"):
        lr_factor(0, "polynomial", 0, 10)


@pytest.mark.parametrize("warmup,total", [(10, 10), (5, 3)])
def test_warmup_not_shorter_than_training_warns_and_ramps(warmup, total, caplog):
    """diffusers accepts it (its own example test: warmup 5 in a 3-step run): the lr ramps and never peaks."""
    lrs = _lrs("cosine", warmup, total)
    assert "never reaches its peak" in caplog.text
    assert lrs == pytest.approx([LR * s / warmup for s in range(total + 1)], abs=1e-12)
    assert lrs == pytest.approx([LR * lr_factor(s, "cosine", warmup, total) for s in range(total + 1)], abs=1e-12)


def test_negative_warmup_is_a_user_error():
    with pytest.raises(UserError, match="lr_warmup_steps"):
        lr_factor(0, "linear", -1, 10)


@pytest.mark.parametrize("steps,expected", [(1, 0), (20, 2), (500, 50), (100_000, 50)])
def test_default_warmup_fits_any_run_length(steps, expected):
    assert default_warmup_steps(steps) == expected
    build_lr_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR), expected, steps)


def test_schedule_free_defaults_to_constant_and_warns_about_a_decay(caplog):
    assert resolve_lr_scheduler(None, schedule_free=False) == "cosine"
    assert resolve_lr_scheduler(None, schedule_free=True) == "constant"
    assert resolve_lr_scheduler("linear", schedule_free=False) == "linear" and not caplog.records
    assert resolve_lr_scheduler("cosine", schedule_free=True) == "cosine"
    assert "decays the lr of a schedule-free optimizer" in caplog.text
