"""Training metrics of one run: on-device sums per step and per logging interval, reduced only on log steps.

The Trainer calls `add_micro_batch` after each backward pass, `apply_step` or `discard_step` once the optimizer
step is decided, and `reduce` on a log step (ONE collective and one host copy for everything), as torchtitan's
MetricsProcessor does. Nothing here knows about the loop, so the maths is testable on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from diffusers_optim.metrics.buckets import BucketMeter, bucket_keys, bucket_means

# all-reduce (sum) across processes; the identity in one process
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class TrainMetrics:
    """Loss, gradient norm, clipping and loss per timestep bucket, summed on device between log steps."""

    def __init__(self, num_buckets: int, num_train_timesteps: int, max_grad_norm: float,
                 device: torch.device | str = "cpu") -> None:
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device)
        self.buckets = BucketMeter(num_buckets, num_train_timesteps, self.device)  # the logging interval
        self.step_buckets = BucketMeter(num_buckets, num_train_timesteps, self.device)  # the step being run
        self.reset_step()
        self.reset_interval(first_step=0)

    # ---- one optimizer step --------------------------------------------------------------------------
    def add_micro_batch(self, mse: torch.Tensor, timesteps: torch.Tensor, loss: torch.Tensor) -> None:
        """Step-local sums of one micro-batch (no host sync)."""
        self.step_buckets.update(mse, timesteps)
        self.step_loss = self.step_loss + loss.detach().float() * mse.numel()
        self.step_count += mse.numel()

    def apply_step(self, grad_norm: torch.Tensor) -> None:
        """Fold an applied step's sums into the interval; a skipped (non-finite) step is discarded instead,
        so it is counted in train/nonfinite_steps rather than turning the whole interval's curves into NaN."""
        self.loss_sum += self.step_loss
        self.loss_count += self.step_count
        self.applied_steps += 1
        self.grad_norm_sum += grad_norm
        if self.max_grad_norm > 0:
            self.clipped += (grad_norm > self.max_grad_norm).float()
        self.buckets.sums += self.step_buckets.sums
        self.buckets.counts += self.step_buckets.counts
        self.reset_step()

    def discard_step(self) -> None:
        self.reset_step()

    def reset_step(self) -> None:
        self.step_buckets.reset()
        self.step_loss = torch.zeros((), device=self.device)
        self.step_count = 0

    # ---- the logging interval --------------------------------------------------------------------------
    def reset_interval(self, first_step: int) -> None:
        """Start a new logging interval after optimizer step `first_step`."""
        self.first_step = first_step
        self.applied_steps = 0  # steps not skipped as non-finite (the same on every process)
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.clipped = torch.zeros((), device=self.device)
        self.buckets.reset()

    def reduce(self, reduce_sum: ReduceFn, num_processes: int) -> dict[str, float]:
        """The interval's means, reduced across processes in ONE collective (the sync point: log steps only)."""
        local = torch.cat([
            torch.stack([self.loss_sum, torch.as_tensor(float(self.loss_count), device=self.device),
                         self.grad_norm_sum, self.clipped]),
            self.buckets.sums.float(), self.buckets.counts.float()])
        total = reduce_sum(local).tolist()
        k, applied = self.num_buckets, self.applied_steps * num_processes
        sums, counts = torch.tensor(total[4:4 + k]), torch.tensor(total[4 + k:])
        record = {
            "train/loss": total[0] / total[1] if total[1] else float("nan"),
            "train/grad_norm": total[2] / applied if applied else float("nan"),
            "train/clipped_fraction": total[3] / applied if applied else float("nan"),
        }
        record.update(zip(bucket_keys(self.num_train_timesteps, k, "loss_t"), bucket_means(sums, counts).tolist()))
        record.update(zip(bucket_keys(self.num_train_timesteps, k, "count_t"), (int(c) for c in counts.tolist())))
        return record


# ---- parameter statistics ------------------------------------------------------------------------------
class UpdateSnapshot:
    """The weights before an optimizer step, to measure the update the step applied, one tensor at a time.

    On an accelerator the copy lives in host memory, so the device peak grows by one tensor, not by the model
    (issue 13: a parameter-sized spike on log steps can run a run sized to fit out of memory). On a CPU-only run
    host and device are the same memory: the copy costs one copy of the weights while the step runs, at a moment
    when the backward pass's activations are already freed (benchmarks/README.md measures the peak).
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        self.before = [p.detach().to("cpu", copy=True) for p in self.params]

    def update_ratio(self) -> float:
        """||theta_new - theta_old|| / ||theta_old||: how far the step moved the weights."""
        delta_sq, before_sq = self.sums_of_squares()
        return float(delta_sq.sqrt() / before_sq.sqrt().clamp_min(1e-12))

    def sums_of_squares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||theta_new - theta_old||^2, ||theta_old||^2) in float64, accumulated tensor by tensor."""
        delta_sq = torch.zeros((), dtype=torch.float64)
        before_sq = torch.zeros((), dtype=torch.float64)
        for p, b in zip(self.params, self.before):
            old = b.to(p.device, non_blocking=True)
            delta_sq += (p.detach().double() - old.double()).pow(2).sum().cpu()
            before_sq += old.double().pow(2).sum().cpu()
        return delta_sq, before_sq


def param_norm(params: Iterable[torch.Tensor]) -> float:
    return float(torch.nn.utils.get_total_norm([p.detach() for p in params]))
