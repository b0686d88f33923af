"""Every registered optimizer trains a tiny UNet2DModel and round-trips its state dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from diffusers_optim.digits import digits_split
from diffusers_optim.models import build_noise_scheduler, build_unet
from diffusers_optim.optim import create_optimizer, get_spec, list_optimizers

NUM_STEPS = 20


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed noisy batch: 8 digits at 16x16 in [-1, 1], frozen noise and timesteps."""
    images = torch.from_numpy(digits_split()["train_images"][:8]).unsqueeze(1)
    x0 = F.interpolate(images, size=16, mode="bilinear") * 2 - 1
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(x0),), generator=generator)
    return build_noise_scheduler().add_noise(x0, noise, timesteps), noise, timesteps


def train_step(model, optimizer, batch) -> float:
    noisy, noise, timesteps = batch
    loss = F.mse_loss(model(noisy, timesteps).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def reload(optimizer_state: dict, model, name: str) -> torch.optim.Optimizer:
    """A fresh optimizer loaded from a serialized state dict, as a checkpoint resume does."""
    buffer = io.BytesIO()
    torch.save(optimizer_state, buffer)
    buffer.seek(0)
    fresh = create_optimizer(model, name)
    if get_spec(name).needs_train_eval:
        fresh.train()
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    return fresh


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    state_a, state_b = a.state_dict()["state"], b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, entry in state_a.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, state_b[index][key], msg=f"state {index}/{key}")


@pytest.mark.parametrize("name", list_optimizers())
def test_optimizer_trains_and_resumes(name: str, batch) -> None:
    spec = get_spec(name)
    if not spec.is_available():
        pytest.skip(f"optimizer '{name}' needs the package '{spec.package}'")
    model = build_unet("tiny", 16, 1, init_seed=0)
    optimizer = create_optimizer(model, name)
    if spec.needs_train_eval:
        optimizer.train()
    losses = [train_step(model, optimizer, batch) for _ in range(NUM_STEPS)]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss did not go down ({first:.4f} -> {last:.4f})"

    twin = copy.deepcopy(model)
    resumed = reload(optimizer.state_dict(), twin, name)
    assert_same_state(optimizer, resumed)
    train_step(model, optimizer, batch)
    train_step(twin, resumed, batch)
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=f"{name}: parameter {key} differs after resume")
    assert_same_state(optimizer, resumed)
