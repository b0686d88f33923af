"""TrainMetrics and UpdateSnapshot on their own: interval sums, skipped steps, the reduction, the update ratio."""

import math

import pytest
import torch

from diffusers_optim.metrics.train import TrainMetrics, UpdateSnapshot, param_norm


def identity(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def test_interval_means_count_only_applied_steps():
    m = TrainMetrics(num_buckets=2, num_train_timesteps=10, max_grad_norm=1.0)
    m.add_micro_batch(torch.tensor([1.0, 3.0]), torch.tensor([0, 9]), loss=torch.tensor(2.0))
    m.apply_step(torch.tensor(0.5))
    m.add_micro_batch(torch.tensor([float("nan")] * 2), torch.tensor([0, 0]), loss=torch.tensor(float("nan")))
    m.discard_step()  # a non-finite step changes no interval sum
    m.add_micro_batch(torch.tensor([5.0]), torch.tensor([1]), loss=torch.tensor(5.0))
    m.add_micro_batch(torch.tensor([7.0]), torch.tensor([8]), loss=torch.tensor(7.0))  # two micro-batches
    m.apply_step(torch.tensor(3.0))
    record = m.reduce(identity, num_processes=1)
    assert record["train/loss"] == pytest.approx((2 * 2 + 5 + 7) / 4)
    assert record["train/grad_norm"] == pytest.approx(1.75)
    assert record["train/clipped_fraction"] == pytest.approx(0.5)
    assert record["loss_t/0-4"] == pytest.approx(3.0) and record["loss_t/5-9"] == pytest.approx(5.0)
    assert (record["count_t/0-4"], record["count_t/5-9"]) == (2, 2)


def test_reduction_sums_processes_and_reset_starts_a_new_interval():
    m = TrainMetrics(num_buckets=1, num_train_timesteps=4, max_grad_norm=0.0)
    m.add_micro_batch(torch.tensor([2.0]), torch.tensor([1]), loss=torch.tensor(2.0))
    m.apply_step(torch.tensor(4.0))
    twice = m.reduce(lambda t: 2 * t, num_processes=2)  # two processes holding the same sums
    assert twice["train/loss"] == 2.0 and twice["train/grad_norm"] == 4.0 and twice["count_t/0-3"] == 2
    m.reset_interval(first_step=1)
    empty = m.reduce(identity, num_processes=1)
    assert m.first_step == 1 and math.isnan(empty["train/loss"]) and math.isnan(empty["train/grad_norm"])
    assert math.isnan(empty["loss_t/0-3"]) and empty["count_t/0-3"] == 0


def test_update_ratio_streams_tensor_by_tensor_against_the_closed_form():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7)]
    snapshot = UpdateSnapshot(params)
    before = torch.cat([p.flatten() for p in params]).clone()
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    after = torch.cat([p.flatten() for p in params])
    expected = float((after - before).norm() / before.norm())
    assert snapshot.update_ratio() == pytest.approx(expected, rel=1e-6)
    assert param_norm(params) == pytest.approx(float(after.norm()), rel=1e-6)
