"""Learning-rate schedules: linear warmup then constant / linear / cosine decay.

`build_lr_scheduler` wraps diffusers' `get_scheduler`; `lr_factor` is the same multiplier as a pure function
(nanoGPT's get_lr), tested equal step by step. One scheduler step = one optimizer step.
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers.optimization import SchedulerType, get_cosine_schedule_with_warmup, get_scheduler

from diffusers_optim.errors import UserError, unknown_choice

logger = logging.getLogger(__name__)

# piecewise_constant needs diffusers' step_rules string, which no flag carries.
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s != SchedulerType.PIECEWISE_CONSTANT)
CLOSED_FORMS = ("constant", "constant_with_warmup", "linear", "cosine")


DEFAULT_LR_SCHEDULER = "cosine"
DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")
MAX_DEFAULT_WARMUP_STEPS = 50


def default_warmup_steps(num_training_steps: int) -> int:
    """10% of the run, at most 50 steps: a default that fits any run length (a 20-step trial warms up for 2)."""
    return min(MAX_DEFAULT_WARMUP_STEPS, num_training_steps // 10)


def resolve_lr_scheduler(name: str | None, schedule_free: bool) -> str:
    """The schedule to use: the user's, else cosine, or constant for an optimizer that averages its iterates.

    Schedule-free optimizers replace the decay by iterate averaging weighted by lr^2 (Defazio et al. 2024):
    decaying the lr to 0 gives the last steps almost no weight, which is not the method its authors tested.
    """
    if name is None:
        return "constant" if schedule_free else DEFAULT_LR_SCHEDULER
    if schedule_free and name in DECAYING:
        logger.warning(f"--lr_scheduler {name} decays the lr of a schedule-free optimizer; its authors use a "
                       "constant lr after warmup (drop --lr_scheduler for that)")
    return name


def _check(name: str, num_warmup_steps: int, num_training_steps: int, choices: tuple[str, ...]) -> None:
    if name not in choices:
        raise unknown_choice("--lr_scheduler", name, choices)
    if num_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be >= 0, got {num_warmup_steps}")


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A diffusers LR scheduler; the trainer steps it once per optimizer step (never through accelerate)."""
    _check(name, num_warmup_steps, num_training_steps, LR_SCHEDULERS)
    if num_warmup_steps > 0 and num_warmup_steps >= num_training_steps:
        # diffusers accepts it (its own example test warms up 5 steps of a 3-step run), so a warning, not an error
        logger.warning(f"--lr_warmup_steps {num_warmup_steps} is not shorter than the run ({num_training_steps} steps): "
                       "the lr never reaches its peak")
    if name == "constant" and num_warmup_steps > 0:
        name = "constant_with_warmup"
    if name == "cosine":
        # get_scheduler does not forward num_cycles to the plain cosine schedule.
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles)
    if name == "cosine_with_restarts":
        # There num_cycles counts hard restarts: an integer, at least one.
        num_cycles = max(1, round(num_cycles))
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def lr_factor(
    step: int, name: str, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> float:
    """The LR multiplier after `step` scheduler steps: linear warmup from 0, then constant/linear/cosine decay."""
    _check(name, num_warmup_steps, num_training_steps, CLOSED_FORMS)
    if step < num_warmup_steps:
        return step / num_warmup_steps
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
