"""Diffusion maths against closed forms: targets, add_noise, per-sample MSE, Min-SNR weights, timesteps."""

import numpy as np
import pytest
import torch

from diffusers_optim.diffusion import (
    min_snr_weights,
    per_sample_mse,
    sample_timesteps,
    stratified_timesteps,
    training_target,
)
from diffusers_optim.errors import UserError
from diffusers_optim.metrics.buckets import bucket_edges, bucket_index
from diffusers_optim.models import build_noise_scheduler


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return clean, noise, t


def _abar(scheduler, t):
    return scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)


def test_sample_timesteps_range_and_reproducibility():
    t1 = sample_timesteps(4096, 50, "cpu", torch.Generator().manual_seed(3))
    t2 = sample_timesteps(4096, 50, "cpu", torch.Generator().manual_seed(3))
    assert t1.dtype == torch.long and t1.shape == (4096,)
    assert torch.equal(t1, t2)
    assert t1.min() >= 0 and t1.max() <= 49
    assert len(torch.unique(t1)) == 50
    assert sample_timesteps(3, 10, "cpu").shape == (3,)


def test_epsilon_target_is_noise():
    sched = build_noise_scheduler(prediction_type="epsilon")
    clean, noise, t = _batch()
    assert torch.equal(training_target(sched, clean, noise, t), noise)


def test_sample_target_is_clean():
    sched = build_noise_scheduler(prediction_type="sample")
    clean, noise, t = _batch()
    assert torch.equal(training_target(sched, clean, noise, t), clean)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_v_target_matches_closed_form(beta_schedule):
    sched = build_noise_scheduler(beta_schedule=beta_schedule, prediction_type="v_prediction")
    clean, noise, t = _batch(1)
    abar = _abar(sched, t)
    expected = abar.sqrt() * noise.double() - (1 - abar).sqrt() * clean.double()
    got = training_target(sched, clean, noise, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_add_noise_matches_closed_form_and_v_recovers_x0():
    sched = build_noise_scheduler(prediction_type="v_prediction")
    clean, noise, t = _batch(2)
    abar = _abar(sched, t)
    noisy = sched.add_noise(clean, noise, t)
    torch.testing.assert_close(
        noisy.double(),
        abar.sqrt() * clean.double() + (1 - abar).sqrt() * noise.double(),
        rtol=1e-5,
        atol=1e-5,
    )
    v = training_target(sched, clean, noise, t).double()
    # x0 = sqrt(abar) x_t - sqrt(1 - abar) v: the identity v-prediction samplers rely on.
    torch.testing.assert_close(
        abar.sqrt() * noisy.double() - (1 - abar).sqrt() * v, clean.double(), rtol=1e-4, atol=1e-4
    )


def test_unknown_prediction_type_is_a_user_error():
    sched = build_noise_scheduler()
    sched.register_to_config(prediction_type="flow")
    clean, noise, t = _batch()
    with pytest.raises(UserError, match="prediction_type"):
        training_target(sched, clean, noise, t)
    with pytest.raises(UserError, match="prediction_type"):
        min_snr_weights(sched, t, 5.0)


def test_per_sample_mse_in_float32():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((5, 3, 4, 4)), rng.standard_normal((5, 3, 4, 4))
    expected = ((pred - target) ** 2).reshape(5, -1).mean(axis=1)
    got = per_sample_mse(torch.tensor(pred, dtype=torch.bfloat16), torch.tensor(target, dtype=torch.bfloat16))
    assert got.shape == (5,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=3e-2)
    got32 = per_sample_mse(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_numpy(prediction_type, gamma):
    sched = build_noise_scheduler(prediction_type=prediction_type)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 999])
    abar = sched.alphas_cumprod.numpy().astype(np.float64)[t.numpy()]
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, gamma)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[
        prediction_type
    ]
    got = min_snr_weights(sched, t, gamma)
    assert got.shape == (7,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)
    if prediction_type == "epsilon":
        assert got[0] < 1 and got[-1] == 1  # low noise is down-weighted, high noise kept


@pytest.mark.parametrize("n,T,B", [(64, 1000, 4), (10, 1000, 4), (12, 10, 3), (5, 5, 5)])
def test_stratified_timesteps_land_in_their_buckets(n, T, B):
    t = stratified_timesteps(n, T, B, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.long
    assert torch.equal(bucket_index(t, T, B), torch.arange(n) % B)
    edges = bucket_edges(T, B)
    for i, ti in enumerate(t.tolist()):
        lo, hi = edges[i % B]
        assert lo <= ti <= hi
    again = stratified_timesteps(n, T, B, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_stratified_timesteps_spread_inside_buckets():
    t = stratified_timesteps(4000, 1000, 4, torch.Generator().manual_seed(1))
    first = t[0::4]
    assert first.min() < 20 and first.max() > 230  # uniform over 0..249, not a single point


def test_stratified_timesteps_need_one_image_per_bucket():
    with pytest.raises(UserError, match="num_validation_images"):
        stratified_timesteps(3, 1000, 4, torch.Generator().manual_seed(0))
    assert stratified_timesteps(0, 1000, 4).shape == (0,)
