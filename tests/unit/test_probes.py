"""The gradient probes' maths on a real tiny UNet: the bucket-sum identity, cosines, update and momentum alignment."""

import contextlib
import math

import pytest
import torch

from diffusers_optim.diffusion import per_sample_mse, training_target
from diffusers_optim.metrics.probes import (
    GradProbe,
    GramResult,
    ProbeKeys,
    build_probe_batch,
    dot,
    first_moment_buffers,
    probe_metrics,
)
from diffusers_optim.models import build_noise_scheduler, build_unet
from diffusers_optim.optim import create_optimizer, get_spec, list_optimizers

T, K = 1000, 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_unet("tiny", 16, 1, 0)
    scheduler = build_noise_scheduler(T, "linear", "epsilon")
    images = torch.rand(10, 1, 16, 16) * 2 - 1  # 10 images: buckets of unequal size (3, 3, 2, 2)
    batch = build_probe_batch(images, T, K, seed=7)
    probe = GradProbe(model, scheduler, batch, T, reduce_sum=lambda t: t, autocast=contextlib.nullcontext)
    return model, scheduler, batch, probe


def full_batch_gradient(model, scheduler, batch) -> list[torch.Tensor]:
    """The gradient of the whole probe batch's mean loss, in one backward pass, as a user would compute it."""
    model.eval()
    x, n, t = batch.images, batch.noise, batch.timesteps
    pred = model(scheduler.add_noise(x, n, t), t).sample
    loss = per_sample_mse(pred, training_target(scheduler, x, n, t)).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    model.train()
    return list(grads)


def test_count_weighted_bucket_gradients_sum_to_the_full_batch_gradient(setup):
    model, scheduler, batch, probe = setup
    assert batch.counts == [3, 3, 2, 2]
    losses = probe.bucket_losses(probe.params)
    per_bucket = [probe.gradients(loss, probe.params) for loss in losses]
    n = sum(batch.counts)
    summed = [sum(batch.counts[b] / n * per_bucket[b][i] for b in range(K)) for i in range(len(probe.params))]
    direct = full_batch_gradient(model, scheduler, batch)
    for s, d in zip(summed, direct):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # the probe never writes .grad

    # the streamed Gram matrix equals the one from stored gradients, and gives the full gradient's norm
    probe.measure_before_step(momentum=direct)
    gram = probe.pending.gram
    stored = torch.tensor([[float(dot(ga, gb)) for gb in per_bucket] for ga in per_bucket], dtype=torch.float64)
    torch.testing.assert_close(gram, stored, rtol=1e-6, atol=0)
    w = torch.tensor(batch.counts, dtype=torch.float64) / n
    full_sq = float(dot(direct, direct))
    assert float(w @ gram @ w) == pytest.approx(full_sq, rel=1e-4)
    # the momentum buffer here IS the full gradient: cos 1; per bucket, cos(g_b, g)
    assert float(w @ probe.pending.momentum_dots) == pytest.approx(full_sq, rel=1e-4)
    probe.pending = None


def test_update_along_the_full_descent_direction_has_update_cosine_one(setup):
    model, scheduler, batch, probe = setup
    direct = full_batch_gradient(model, scheduler, batch)
    probe.measure_before_step(momentum=direct)
    before = [p.detach().clone() for p in probe.params]
    update = [-1e-3 * g for g in direct]
    with torch.no_grad():
        for p, u in zip(probe.params, update):
            p.add_(u)
    try:
        record = probe.measure_after_step(before, dot(update, update))
    finally:
        with torch.no_grad():
            for p, b in zip(probe.params, before):
                p.copy_(b)
    keys = ProbeKeys(T, K)
    assert record["grad_t/full_update_cos"] == pytest.approx(1.0, abs=1e-4)
    assert record["grad_t/full_momentum_cos"] == pytest.approx(1.0, abs=1e-4)
    for key in [*keys.cos, *keys.update_cos, *keys.momentum_cos, "grad_t/cos_mean"]:
        assert -1.0 <= record[key] <= 1.0, key
    # descent along the full gradient serves each bucket as much as that bucket agrees with the whole batch
    for b, key in enumerate(keys.update_cos):
        assert record[key] == pytest.approx(record[keys.momentum_cos[b]], abs=1e-4)
    assert record["grad_t/full_norm"] == pytest.approx(math.sqrt(float(dot(direct, direct))), rel=1e-4)


def test_metrics_from_dot_products_match_numpy_and_identical_gradients_have_cosine_one():
    rng = torch.Generator().manual_seed(3)
    g = torch.randn(3, 50, generator=rng, dtype=torch.float64)
    g[2] = g[0]  # two identical bucket gradients
    m, update = torch.randn(50, generator=rng, dtype=torch.float64), torch.randn(50, generator=rng, dtype=torch.float64)
    counts = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    result = GramResult(g @ g.T, g @ m, m @ m)
    record = probe_metrics(result, counts, g @ update, update @ update, ProbeKeys(30, 3))
    full = (counts / counts.sum()) @ g

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert record["grad_t/cos/00-09__20-29"] == pytest.approx(1.0)
    assert record["grad_t/cos/00-09__10-19"] == pytest.approx(cos(g[0], g[1]))
    assert record["grad_t/cos_mean"] == pytest.approx((2 * cos(g[0], g[1]) + 1) / 3)
    assert record["grad_t/norm/10-19"] == pytest.approx(float(g[1].norm()))
    assert record["grad_t/full_norm"] == pytest.approx(float(full.norm()))
    assert record["grad_t/update_cos/10-19"] == pytest.approx(cos(-g[1], update))
    assert record["grad_t/full_update_cos"] == pytest.approx(cos(-full, update))
    assert record["grad_t/momentum_cos/20-29"] == pytest.approx(cos(g[2], m))
    assert record["grad_t/full_momentum_cos"] == pytest.approx(cos(full, m))


def test_a_zero_gradient_has_no_angle_and_no_buffer_means_no_momentum_keys():
    gram = torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    record = probe_metrics(GramResult(gram, None, None), torch.tensor([1.0, 1.0], dtype=torch.float64),
                           torch.zeros(2, dtype=torch.float64), torch.tensor(0.0), ProbeKeys(10, 2))
    assert math.isnan(record["grad_t/cos/0-4__5-9"]) and math.isnan(record["grad_t/update_cos/5-9"])
    assert record["grad_t/norm/5-9"] == 2.0 and not any("momentum" in k for k in record)


@pytest.mark.parametrize("name", list_optimizers())
def test_registry_first_moment_state_names_a_buffer_the_optimizer_keeps(name):
    spec = get_spec(name)
    if not spec.is_available():
        pytest.skip(f"{spec.package} is not installed")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    hparams = {"momentum": 0.9} if name == "rmsprop" else {}  # RMSprop keeps a buffer only with momentum
    optimizer = create_optimizer(model, name, **hparams)
    if spec.needs_train_eval:
        optimizer.train()
    params = list(model.parameters())
    assert first_moment_buffers(optimizer, params, spec.first_moment_state) is None  # no state before a step
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    buffers = first_moment_buffers(optimizer, params, spec.first_moment_state)
    if spec.first_moment_state is None:
        assert buffers is None
    elif name == "adafactor":  # transformers' Adafactor keeps exp_avg only with beta1 set (default None)
        assert buffers is None or len(buffers) == len(params)
    else:
        assert buffers is not None and [b.shape for b in buffers] == [p.shape for p in params], name
