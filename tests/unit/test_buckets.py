"""Timestep buckets: edges, keys, indices and on-device means against a numpy reference."""

import numpy as np
import pytest
import torch

from diffusers_optim.errors import UserError
from diffusers_optim.metrics.buckets import BucketMeter, bucket_edges, bucket_index, bucket_keys, bucket_means


def test_edges_of_1000_in_4():
    assert bucket_edges(1000, 4) == [(0, 249), (250, 499), (500, 749), (750, 999)]


@pytest.mark.parametrize("T,B", [(1000, 4), (1000, 3), (10, 3), (7, 7), (1, 1), (999, 10), (50, 1)])
def test_edges_cover_every_timestep_once_and_agree_with_index(T, B):
    edges = bucket_edges(T, B)
    assert len(edges) == B
    covered = [t for lo, hi in edges for t in range(lo, hi + 1)]
    assert covered == list(range(T))
    sizes = [hi - lo + 1 for lo, hi in edges]
    assert max(sizes) - min(sizes) <= 1
    idx = bucket_index(torch.arange(T), T, B).tolist()
    for b, (lo, hi) in enumerate(edges):
        assert idx[lo : hi + 1] == [b] * (hi - lo + 1)


def test_keys_are_zero_padded():
    assert bucket_keys(1000, 4, "loss_t") == [
        "loss_t/000-249",
        "loss_t/250-499",
        "loss_t/500-749",
        "loss_t/750-999",
    ]
    assert bucket_keys(1000, 2, "val_t") == ["val_t/000-499", "val_t/500-999"]
    assert bucket_keys(10000, 2, "loss_t")[0] == "loss_t/0000-4999"
    assert bucket_keys(10, 3, "loss_t") == ["loss_t/0-3", "loss_t/4-6", "loss_t/7-9"]


@pytest.mark.parametrize("B", [0, -1, 1001])
def test_bad_bucket_count_is_a_user_error(B):
    with pytest.raises(UserError, match="num_timestep_buckets"):
        bucket_edges(1000, B)
    with pytest.raises(UserError):
        BucketMeter(B, 1000)


def _numpy_means(losses, timesteps, T, B):
    edges = bucket_edges(T, B)
    out = np.full(B, np.nan)
    for b, (lo, hi) in enumerate(edges):
        mask = (timesteps >= lo) & (timesteps <= hi)
        if mask.any():
            out[b] = losses[mask].mean()
    return out


@pytest.mark.parametrize("T,B", [(1000, 4), (1000, 10), (10, 3), (37, 5)])
def test_meter_means_match_numpy(T, B):
    rng = np.random.default_rng(T * 100 + B)
    meter = BucketMeter(B, T, "cpu")
    all_losses, all_t = [], []
    for _ in range(5):
        losses = rng.random(13).astype(np.float32)
        t = rng.integers(0, T, 13)
        meter.update(torch.from_numpy(losses), torch.from_numpy(t))
        all_losses.append(losses)
        all_t.append(t)
    expected = _numpy_means(np.concatenate(all_losses), np.concatenate(all_t), T, B)
    got = meter.means(meter.sums, meter.counts).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, equal_nan=True)
    assert meter.counts.sum().item() == 65


def test_empty_buckets_are_nan_and_reset_zeroes():
    meter = BucketMeter(4, 1000)
    meter.update(torch.tensor([2.0, 4.0]), torch.tensor([10, 20]))
    means = bucket_means(meter.sums, meter.counts)
    assert means[0].item() == 3.0
    assert torch.isnan(means[1:]).all()
    sums = meter.sums
    meter.reset()
    assert meter.sums is sums
    assert meter.counts.sum().item() == 0
    assert torch.isnan(bucket_means(meter.sums, meter.counts)).all()


def test_update_never_syncs_with_host(monkeypatch):
    meter = BucketMeter(4, 1000, "cpu")
    loss = torch.rand(8, requires_grad=True) * 2
    t = torch.randint(0, 1000, (8,))

    def no_sync(*args, **kwargs):
        raise AssertionError("BucketMeter.update read a tensor back to the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    meter.update(loss, t)
    monkeypatch.undo()
    assert not meter.sums.requires_grad
    assert meter.sums.device == meter.counts.device == torch.device("cpu")
    assert meter.counts.sum().item() == 8


def test_meter_moves_inputs_to_its_device():
    meter = BucketMeter(2, 100, torch.device("cpu"))
    meter.update(torch.ones(3, dtype=torch.bfloat16), torch.tensor([0, 50, 99], dtype=torch.int32))
    assert meter.sums.dtype == torch.float32
    assert meter.sums.device == torch.device("cpu")
    assert meter.counts.tolist() == [1.0, 2.0]
