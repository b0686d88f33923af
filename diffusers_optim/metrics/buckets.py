"""Timestep buckets: loss per noise level (improved-diffusion's loss_q0..q3), accumulated on device.

Bucket i holds the timesteps t with floor(t * num_buckets / T) == i, so edges and indices always agree.
"""

from __future__ import annotations

import torch

from diffusers_optim.errors import UserError


def _check(num_train_timesteps: int, num_buckets: int) -> None:
    if num_train_timesteps < 1:
        raise UserError(f"the number of diffusion timesteps must be positive, got {num_train_timesteps}")
    if not 1 <= num_buckets <= num_train_timesteps:
        raise UserError(
            f"--num_timestep_buckets must be between 1 and the number of timesteps ({num_train_timesteps}), "
            f"got {num_buckets}"
        )


def bucket_edges(num_train_timesteps: int, num_buckets: int) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) timestep ranges of equal size (within one) covering 0..T-1 exactly once."""
    _check(num_train_timesteps, num_buckets)
    T, B = num_train_timesteps, num_buckets
    starts = [-(-i * T // B) for i in range(B + 1)]  # ceil(i * T / B)
    return [(starts[i], starts[i + 1] - 1) for i in range(B)]


def bucket_keys(num_train_timesteps: int, num_buckets: int, prefix: str) -> list[str]:
    """Metric keys such as `loss_t/000-249`, zero-padded to the width of T-1 so they sort as numbers."""
    width = len(str(num_train_timesteps - 1))
    edges = bucket_edges(num_train_timesteps, num_buckets)
    return [f"{prefix}/{lo:0{width}d}-{hi:0{width}d}" for lo, hi in edges]


def bucket_index(timesteps: torch.Tensor, num_train_timesteps: int, num_buckets: int) -> torch.LongTensor:
    """The bucket of each timestep (expected in [0, T)), on the timesteps' device."""
    return torch.div(timesteps.long() * num_buckets, num_train_timesteps, rounding_mode="floor")


def bucket_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean per bucket, NaN where a bucket saw no sample."""
    nan = torch.full_like(sums, float("nan"))
    return torch.where(counts > 0, sums / counts.clamp(min=1), nan)


class BucketMeter:
    """Sums and counts of per-sample losses per timestep bucket, kept on device until a log step reads them."""

    def __init__(
        self, num_buckets: int, num_train_timesteps: int, device: torch.device | str = "cpu"
    ) -> None:
        _check(num_train_timesteps, num_buckets)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        self.device = torch.device(device)
        # float32, not float64: MPS has no float64, and the meter is reset at every log step.
        self.sums = torch.zeros(num_buckets, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(num_buckets, dtype=torch.float32, device=self.device)

    def update(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Add a batch of per-sample losses; no host sync (no .item(), no data-dependent branch)."""
        idx = bucket_index(timesteps.to(self.device), self.num_train_timesteps, self.num_buckets)
        loss = per_sample_loss.detach().to(device=self.device, dtype=torch.float32).reshape(-1)
        self.sums.index_add_(0, idx, loss)
        self.counts.index_add_(0, idx, torch.ones_like(loss))

    def reset(self) -> None:
        """Zero the sums and counts in place (keeps the tensors, so references to them stay valid)."""
        self.sums.zero_()
        self.counts.zero_()

    means = staticmethod(bucket_means)
