"""Validation draws and standard errors: known answers on synthetic losses, frozen stratified draws."""

import numpy as np
import pytest
import torch

from diffusers_optim.metrics.buckets import bucket_index
from diffusers_optim.metrics.validation import (
    ValidationMeter,
    validation_batches,
    validation_draw,
    validation_record,
)


def test_record_matches_numpy_stratified_mean_and_standard_errors():
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.integers(0, 1000, size=200))
    loss = torch.from_numpy(rng.gamma(2.0, 0.1, size=200)).float()
    meter = ValidationMeter(4, 1000)
    meter.update(loss[:120], t[:120])
    meter.update(loss[120:], t[120:])  # accumulates like several validation chunks do
    record = validation_record(meter.state(), 1000)
    buckets = (t.numpy() * 4) // 1000
    values = [loss.numpy()[buckets == b].astype(np.float64) for b in range(4)]
    ses = [v.std(ddof=1) / np.sqrt(len(v)) for v in values]
    weights = [len(v) / 200 for v in values]
    assert record["val/loss"] == pytest.approx(loss.double().mean().item(), rel=1e-5)
    assert record["val/loss_se"] == pytest.approx(np.sqrt(sum(w**2 * s**2 for w, s in zip(weights, ses))), rel=1e-4)
    assert record["val_t/000-249"] == pytest.approx(values[0].mean(), rel=1e-5)
    assert record["val_t_se/750-999"] == pytest.approx(ses[3], rel=1e-4)


def test_a_bucket_with_one_sample_has_no_standard_error_and_an_empty_one_no_mean():
    meter = ValidationMeter(2, 10)
    meter.update(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 1, 7]))
    record = validation_record(meter.state(), 10)
    assert record["val_t/0-4"] == pytest.approx(1.5) and record["val_t/5-9"] == 4.0
    assert np.isnan(record["val_t_se/5-9"]) and record["val_t_se/0-4"] == pytest.approx(0.5)
    empty = validation_record(ValidationMeter(2, 10).state(), 10)
    assert np.isnan(empty["val/loss"]) and np.isnan(empty["val_t/0-4"])


def test_draws_are_frozen_stratified_and_rotate_images_through_the_buckets():
    shape = torch.Size((8, 1, 4, 4))
    noise0, t0 = validation_draw(shape, 0, 1000, 4)
    again, t_again = validation_draw(shape, 0, 1000, 4)
    noise1, t1 = validation_draw(shape, 1, 1000, 4)
    assert torch.equal(noise0, again) and torch.equal(t0, t_again)
    assert not torch.equal(noise0, noise1)
    for t in (t0, t1):
        assert torch.bincount(bucket_index(t, 1000, 4), minlength=4).tolist() == [2, 2, 2, 2]
    visited = torch.stack([bucket_index(validation_draw(shape, d, 1000, 4)[1], 1000, 4) for d in range(4)])
    assert all(sorted(col.tolist()) == [0, 1, 2, 3] for col in visited.T)  # every image, every bucket once


def test_processes_share_out_every_image_of_every_draw_once():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    seen = []
    for rank in range(3):
        for x, n, t in validation_batches(images, 2, 1000, 2, rank, 3, batch_size=2):
            seen += x.flatten().tolist()
            assert len(x) == len(n) == len(t) <= 2
    assert sorted(seen) == sorted(list(range(10)) * 2)
