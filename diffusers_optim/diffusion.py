"""Pure diffusion maths: timestep sampling, training targets, per-sample loss, Min-SNR weights.

No trainer state lives here; every function is a closed form tested against a hand-written reference.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffusers_optim.errors import UserError
from diffusers_optim.metrics.buckets import bucket_edges

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Timesteps drawn uniformly from [0, num_train_timesteps)."""
    # Draw on the generator's device, then move: a CPU generator keeps runs reproducible across devices.
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch_size,), device=gen_device, generator=generator)
    return t.to(device) if device is not None else t


def _prediction_type(noise_scheduler: DDPMScheduler) -> str:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"unsupported prediction_type '{prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


def training_target(
    noise_scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output for `noise_scheduler.add_noise(clean, noise, timesteps)`."""
    prediction_type = _prediction_type(noise_scheduler)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    return clean


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, shape (B,), computed in float32 whatever the input dtype."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' train_text_to_image.py; shape (B,)."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = _prediction_type(noise_scheduler)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def stratified_timesteps(
    n: int, num_train_timesteps: int, num_buckets: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """n timesteps on the CPU, sample i uniform inside bucket i % num_buckets, so every bucket is covered."""
    if 0 < n < num_buckets:
        raise UserError(
            f"{n} validation images cannot cover {num_buckets} timestep buckets: raise --num_validation_images "
            f"or lower --num_timestep_buckets"
        )
    edges = torch.tensor(bucket_edges(num_train_timesteps, num_buckets), dtype=torch.long)
    which = torch.arange(n) % num_buckets
    lo, hi = edges[which, 0], edges[which, 1]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    offset = (u * (hi - lo + 1)).long().clamp(max=hi - lo)
    return lo + offset
