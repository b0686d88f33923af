"""Per-timestep gradient probes: how each noise level pulls on the weights, and which of them a step serves.

On a fixed probe batch (held-out images, frozen noise, bucket-stratified timesteps: the same for every optimizer
and every probe) g_b is the gradient of timestep bucket b's mean loss, and g = sum_b (n_b / n) g_b the gradient
of the whole probe batch's mean loss. Logged with the key scheme of `loss_t/`:

- `grad_t/norm/<lo>-<hi>`: ||g_b||; `grad_t/full_norm`: ||g||.
- `grad_t/cos/<a>__<b>`: cos(g_a, g_b), the conflict between two noise levels; `grad_t/cos_mean`: mean over pairs.
- `grad_t/update_cos/<lo>-<hi>`: cos(-g_b, update applied at this step): which noise levels the step served
  (positive: the step lowers that bucket's loss to first order); `grad_t/full_update_cos` for g.
- `grad_t/momentum_cos/<lo>-<hi>`, `grad_t/full_momentum_cos`: cos(g_b, m) and cos(g, m) with the optimizer's
  first-moment buffer m before the step (the state key comes from the registry spec): how much the step's
  history agrees with the present gradient (the beta1 question). Absent for optimizers without such a buffer.

Memory: no per-bucket gradient is stored. The Gram matrix <g_a, g_b> is accumulated tensor by tensor with ONE
held gradient: row a holds g_a while g_b for b = K-1 .. a+1 are computed one at a time, and the last of them,
g_{a+1}, is kept as the next row's. That is K + (K-1)(K-2)/2 backward passes over one bucket's share of the
probe batch each (7 for 4 buckets), with at most two gradients alive (the held one and the one being computed):
one gradient copy above a training step's own. The update's dot products use the weights saved before the step
(the update-ratio snapshot, `UpdateSnapshot`), after the training gradients are freed.

Training is never changed: the probe uses `torch.autograd.grad` (no `.grad` is written), its own frozen noise
(no global RNG draw), the model in eval mode (no dropout draw, no BatchNorm statistics update), and the weights
before the step through `torch.func.functional_call` (the model's parameters are never swapped).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffusers_optim.diffusion import per_sample_mse, stratified_timesteps, training_target
from diffusers_optim.metrics.buckets import bucket_index, bucket_keys

# Sums gradients across processes, tensor by tensor (the identity in one process).
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ProbeBatch:
    """This process's share of the probe batch (on the device), and the GLOBAL sample count of each bucket."""

    images: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    counts: list[int]


def build_probe_batch(images: torch.Tensor, num_train_timesteps: int, num_buckets: int, seed: int,
                      rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> ProbeBatch:
    """Frozen noise and bucket-stratified timesteps drawn from `seed`, sharded across processes."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    t = stratified_timesteps(len(images), num_train_timesteps, num_buckets, g)
    counts = torch.bincount(bucket_index(t, num_train_timesteps, num_buckets), minlength=num_buckets).tolist()
    shard = slice(rank, None, world)
    return ProbeBatch(images[shard].to(device), noise[shard].to(device), t[shard].to(device), counts)


def first_moment_buffers(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                         state_key: str | None) -> list[torch.Tensor] | None:
    """The optimizer's first-moment buffer of every parameter, or None when any is missing (no state yet,
    momentum 0, or an optimizer without one): a cosine over part of the weights would not mean the same."""
    if state_key is None:
        return None
    buffers = [optimizer.state.get(p, {}).get(state_key) for p in params]
    ok = all(torch.is_tensor(m) and m.shape == p.shape and m.is_floating_point() for m, p in zip(buffers, params))
    return buffers if ok and buffers else None


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i <x_i, y_i> in float64, tensor by tensor (no flattened copy of either)."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(xs, ys):
        total += torch.sum(x * y.to(x.device, x.dtype), dtype=torch.float64).cpu()
    return total


@dataclass
class GramResult:
    """Before the step: <g_a, g_b>, <g_b, m> and ||m||^2 (the last two None without a first-moment buffer)."""

    gram: torch.Tensor
    momentum_dots: torch.Tensor | None
    momentum_sq: torch.Tensor | None


class GradProbe:
    """Per-bucket gradients of the probe batch at the weights a step starts from; see the module docstring."""

    def __init__(self, model: torch.nn.Module, noise_scheduler, batch: ProbeBatch, num_train_timesteps: int,
                 reduce_sum: ReduceFn, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.noise_scheduler = noise_scheduler
        self.batch = batch
        self.reduce_sum = reduce_sum
        self.autocast = autocast
        k = len(batch.counts)
        self.members = [torch.nonzero(bucket_index(batch.timesteps, num_train_timesteps, k) == b).flatten()
                        for b in range(k)]
        self.keys = ProbeKeys(num_train_timesteps, k)
        self.pending: GramResult | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    # ---- the two measurements of a probe step ------------------------------------------------------------
    def measure_before_step(self, momentum: list[torch.Tensor] | None) -> None:
        """Gram matrix of the bucket gradients (and their dots with m) at the current weights."""
        params = self.params
        with self.eval_mode(), torch.enable_grad():
            losses = self.bucket_losses(params)
            k = len(losses)
            gram = torch.zeros(k, k, dtype=torch.float64)
            mom = torch.zeros(k, dtype=torch.float64) if momentum is not None else None
            held = self.gradients(losses[0], params)
            for a in range(k):
                gram[a, a] = dot(held, held)
                if mom is not None:
                    mom[a] = dot(held, momentum)
                following = None
                for b in range(k - 1, a, -1):  # a+1 last, so it is kept as the next row's held gradient
                    g = self.gradients(losses[b], params)
                    gram[a, b] = gram[b, a] = dot(held, g)
                    following = g if b == a + 1 else None
                    del g
                held = following
            del losses
        self.pending = GramResult(gram, mom, dot(momentum, momentum) if momentum is not None else None)

    def measure_after_step(self, before: Sequence[torch.Tensor], update_sq: torch.Tensor) -> dict[str, float]:
        """<g_b, update> at the weights `before` the step (the snapshot), then the probe's metrics."""
        device = self.params[0].device
        point = [b.to(device).detach().requires_grad_(True) for b in before]
        update_dots = torch.zeros(len(self.members), dtype=torch.float64)
        with self.eval_mode(), torch.enable_grad():
            losses = self.bucket_losses(point)
            for b, loss in enumerate(losses):
                g = self.gradients(loss, point)
                update_dots[b] = sum(torch.sum(gi * (p.detach() - x.detach()), dtype=torch.float64).cpu()
                                     for gi, p, x in zip(g, self.params, point))
                del g
        gram, self.pending = self.pending, None
        return probe_metrics(gram, torch.tensor(self.batch.counts, dtype=torch.float64), update_dots,
                             update_sq, self.keys)

    # ---- helpers -------------------------------------------------------------------------------------
    def bucket_losses(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each bucket's share of the global mean loss, one forward per bucket (None: no local sample)."""
        b_ = self.batch
        weights = {n: p for (n, _), p in zip(self.named, params)}
        losses: list[torch.Tensor | None] = []
        for b, idx in enumerate(self.members):
            if len(idx) == 0:
                losses.append(None)
                continue
            x, n, t = b_.images[idx], b_.noise[idx], b_.timesteps[idx]
            with self.autocast():
                pred = torch.func.functional_call(self.model, weights, (self.noise_scheduler.add_noise(x, n, t), t))
            mse = per_sample_mse(pred.sample, training_target(self.noise_scheduler, x, n, t))
            losses.append(mse.sum() / b_.counts[b])  # sum over processes = the bucket's global mean
        return losses

    def gradients(self, loss: torch.Tensor | None, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """d loss / d params summed over processes, replaced tensor by tensor (never two full copies)."""
        if loss is None:
            grads = [torch.zeros_like(p) for p in params]
        else:
            found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]
            del found
        for i in range(len(grads)):
            # contiguous: a backward pass may return a gradient in another memory layout than the zeros of a
            # process with no sample in this bucket, and a collective sums raw memory, element by element
            grads[i] = self.reduce_sum(grads[i].contiguous())
        return grads

    @contextlib.contextmanager
    def eval_mode(self):
        """No dropout draw from the global RNG and no BatchNorm statistics update; the mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


# ---- keys and the closed-form maths (testable without a model) -----------------------------------------------
class ProbeKeys:
    """The metric keys of the probes, with the zero-padded bucket ranges of `loss_t/`."""

    def __init__(self, num_train_timesteps: int, num_buckets: int) -> None:
        self.ranges = [k.split("/", 1)[1] for k in bucket_keys(num_train_timesteps, num_buckets, "x")]
        self.norm = [f"grad_t/norm/{r}" for r in self.ranges]
        self.update_cos = [f"grad_t/update_cos/{r}" for r in self.ranges]
        self.momentum_cos = [f"grad_t/momentum_cos/{r}" for r in self.ranges]
        k = num_buckets
        self.pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        self.cos = [f"grad_t/cos/{self.ranges[a]}__{self.ranges[b]}" for a, b in self.pairs]


def _cos(dot_ab: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """dot / (|a| |b|) clamped to [-1, 1]; NaN where a norm is 0 (the angle is undefined)."""
    denom = norm_a * norm_b
    return torch.where(denom > 0, (dot_ab / denom.clamp_min(1e-300)).clamp(-1, 1), torch.full_like(denom, math.nan))


def probe_metrics(before: GramResult, counts: torch.Tensor, update_dots: torch.Tensor, update_sq: torch.Tensor,
                  keys: ProbeKeys) -> dict[str, float]:
    """All probe metrics from the dot products: Gram matrix, dots with the update and with m (float64)."""
    gram = before.gram
    norms = gram.diagonal().clamp_min(0).sqrt()
    w = counts / counts.sum()
    full_norm = (w @ gram @ w).clamp_min(0).sqrt()
    update_norm = update_sq.to(torch.float64).clamp_min(0).sqrt()
    record = dict(zip(keys.norm, norms.tolist()))
    record["grad_t/full_norm"] = float(full_norm)
    cos = [float(_cos(gram[a, b], norms[a], norms[b])) for a, b in keys.pairs]
    record.update(zip(keys.cos, cos))
    if cos:
        record["grad_t/cos_mean"] = sum(cos) / len(cos)
    # the descent direction is -g: a positive cosine means the step lowered that loss to first order
    record.update(zip(keys.update_cos, _cos(-update_dots, norms, update_norm).tolist()))
    record["grad_t/full_update_cos"] = float(_cos(-(w @ update_dots), full_norm, update_norm))
    if before.momentum_dots is not None:
        m_norm = before.momentum_sq.clamp_min(0).sqrt()
        record.update(zip(keys.momentum_cos, _cos(before.momentum_dots, norms, m_norm).tolist()))
        record["grad_t/full_momentum_cos"] = float(_cos(w @ before.momentum_dots, full_norm, m_norm))
    return record
