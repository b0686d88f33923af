"""Validation loss on frozen held-out images: several noise/timestep draws per image, with standard errors.

Draw d of the validation set is a pure function of (VALIDATION_SEED, d): every run, optimizer, seed and process
count sees the same noise and timesteps, so validation curves differ only by the model. Timesteps are
bucket-stratified (image i of draw d lies in bucket (i - d) mod K), so every bucket gets the same number of
samples and, over K draws, every image visits every bucket once.

Standard errors treat the samples of a bucket as independent draws (their sample variance / count) and combine
buckets as a stratified mean: SE(val/loss)^2 = sum_b (n_b / N)^2 SE_b^2.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from diffusers_optim.diffusion import stratified_timesteps
from diffusers_optim.metrics.buckets import BucketMeter, bucket_keys
from diffusers_optim.metrics.keys import VAL_LOSS, se_key

VALIDATION_SEED = 1234  # not --seed: the validation draws are the same for every run of every comparison


def validation_draw(shape: torch.Size, draw: int, num_train_timesteps: int,
                    num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (shape) and bucket-stratified timesteps (shape[0],) of one frozen draw, on the CPU."""
    g = torch.Generator().manual_seed(VALIDATION_SEED + 7919 * draw)
    noise = torch.randn(shape, generator=g)
    t = stratified_timesteps(shape[0], num_train_timesteps, num_buckets, g).roll(draw)
    return noise, t


def validation_batches(images: torch.Tensor, num_draws: int, num_train_timesteps: int, num_buckets: int,
                       rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images, noise, timesteps) chunks of this process's share of every draw (image i goes to rank i % world)."""
    mine = torch.arange(len(images))[rank::world]
    for draw in range(num_draws):
        noise, t = validation_draw(images.shape, draw, num_train_timesteps, num_buckets)
        for chunk in mine.split(batch_size):
            yield images[chunk], noise[chunk], t[chunk]


class ValidationMeter:
    """Per-bucket sums, sums of squares and counts of per-sample validation losses, on device."""

    def __init__(self, num_buckets: int, num_train_timesteps: int, device: torch.device | str = "cpu"):
        self.first = BucketMeter(num_buckets, num_train_timesteps, device)
        self.second = BucketMeter(num_buckets, num_train_timesteps, device)

    def update(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> None:
        loss = per_sample_loss.detach().float()
        self.first.update(loss, timesteps)
        self.second.update(loss.square(), timesteps)

    def state(self) -> torch.Tensor:
        """(3K,) sums, sums of squares, counts: one tensor, so processes reduce it in one collective."""
        return torch.cat([self.first.sums, self.second.sums, self.first.counts])


def validation_record(state: torch.Tensor, num_train_timesteps: int) -> dict[str, float]:
    """val/loss, val/loss_se, val_t/<bucket> and val_t_se/<bucket> from a (reduced) ValidationMeter state."""
    sums, squares, counts = state.double().cpu().view(3, -1)
    means, ses = bucket_mean_se(sums, squares, counts)
    weights = counts / counts.sum().clamp_min(1)
    record = {VAL_LOSS: float((weights * means.nan_to_num()).sum()) if counts.sum() else float("nan"),
              se_key(VAL_LOSS): float((weights.square() * ses.nan_to_num().square()).sum().sqrt())}
    keys = bucket_keys(num_train_timesteps, len(counts), "val_t")
    record.update(zip(keys, means.tolist()))
    record.update(zip(map(se_key, keys), ses.tolist()))
    return record


def bucket_mean_se(sums: torch.Tensor, squares: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean per bucket (NaN mean without samples, NaN SE with fewer than 2)."""
    n = counts.clamp_min(1)
    means = torch.where(counts > 0, sums / n, torch.nan)
    variance = ((squares - n * means.nan_to_num().square()) / (n - 1).clamp_min(1)).clamp_min(0)
    ses = torch.where(counts > 1, (variance / n).sqrt(), torch.nan)
    return means, ses
