"""Resolve, then build: `resolve(name, hparams)` maps generic hyperparameters onto the optimizer's own arguments
and checks them (once, before anything is built); `build(resolved, params)` makes the torch optimizer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from diffusers_optim.errors import UserError, closest_match
from diffusers_optim.optim.groups import param_groups
from diffusers_optim.optim.registry import OptimizerRegistry, default_registry
from diffusers_optim.optim.spec import GENERIC_HPARAMS, OptimizerSpec
from diffusers_optim.speed import fast_step_kwargs

logger = logging.getLogger(__name__)


def _check_unit_interval(name: str, optimizer: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserError(f"optimizer '{optimizer}': {name} must be in [0, 1), got {value!r}")


def validate_generic(optimizer: str, values: dict[str, Any]) -> None:
    """Out-of-range generic hyperparameters are a UserError, before anything is built."""
    for key in ("lr", "eps"):
        value = values.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"optimizer '{optimizer}': {key} must be a number > 0, got {value!r}")
    wd = values.get("weight_decay")
    if wd is not None and (not isinstance(wd, (int, float)) or wd < 0):
        raise UserError(f"optimizer '{optimizer}': weight_decay must be >= 0, got {wd!r}")
    if values.get("momentum") is not None:
        _check_unit_interval("momentum", optimizer, values["momentum"])
    betas = values.get("betas")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) not in (2, 3):
            raise UserError(
                f"optimizer '{optimizer}': betas must be 2 or 3 numbers, e.g. (0.9,0.999); got {betas!r}"
            )
        for beta in betas:
            _check_unit_interval("each of betas", optimizer, beta)


def _fill_betas(spec: OptimizerSpec, betas: Any) -> Any:
    """(0.9, None) -> (0.9, the spec's beta2); a missing beta3 is the spec's too (AdEMAMix, CAME)."""
    if not isinstance(betas, (tuple, list)):
        return betas  # validate_generic explains what is wrong with it
    if all(beta is None for beta in betas):
        return None
    betas, default = tuple(betas), spec.defaults.get("betas")
    if default is not None and len(default) >= len(betas):
        betas = tuple(d if b is None else b for b, d in zip(betas, default)) + tuple(default[len(betas) :])
    return betas


def accepted_args(spec: OptimizerSpec) -> list[str] | None:
    """Keyword arguments the optimizer takes (None: an opaque factory that takes anything)."""
    params = list(inspect.signature(spec.load_factory()).parameters.values())[1:]  # drop `params`
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    # **kwargs alone means a wrapper we cannot see through; a class with named args plus **kwargs
    # (pytorch_optimizer) would swallow a misspelled name silently, so we hold it to its named args.
    return named or None


def _check_accepted(spec: OptimizerSpec, kwargs: dict[str, Any]) -> None:
    accepted = accepted_args(spec)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            hint = closest_match(key, accepted)
            did_you_mean = f" Did you mean '{hint}'?" if hint else ""
            raise UserError(
                f"optimizer '{spec.name}' does not take the hyperparameter '{key}'.{did_you_mean} "
                f"It takes: {', '.join(accepted)}"
            )


def _warn_ignored(spec: OptimizerSpec, generic: dict[str, Any]) -> None:
    for key, value in generic.items():
        if value is not None and key not in spec.hparam_names:
            logger.warning("optimizer '%s' has no %s; ignoring %s=%r", spec.name, key, key, value)


@dataclass(frozen=True)
class ResolvedOptimizer:
    """A spec and the exact keyword arguments it is built with (its own names, defaults filled, checked)."""

    spec: OptimizerSpec
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    @property
    def lr(self) -> float | None:
        """The peak learning rate (Prodigy-style: the multiplier)."""
        return self.kwargs.get(self.spec.hparam_names.get("lr", "lr"))


def resolve(
    name: str | OptimizerSpec, hparams: Mapping[str, Any] | None = None, registry: OptimizerRegistry | None = None
) -> ResolvedOptimizer:
    """Generic names (lr, betas, ...) and the optimizer's own extras -> its keyword arguments; UserError if bad."""
    spec = name if isinstance(name, OptimizerSpec) else (registry or default_registry()).get(name)
    extras = dict(hparams or {})
    generic = {key: extras.pop(key, None) for key in GENERIC_HPARAMS}
    generic["betas"] = _fill_betas(spec, generic["betas"])
    _warn_ignored(spec, generic)
    generic = {k: (v if k in spec.hparam_names else None) for k, v in generic.items()}  # ignored: not checked
    validate_generic(spec.name, generic)
    kwargs = {k: v for k, v in spec.defaults.items() if k not in GENERIC_HPARAMS}
    for key, own_name in spec.hparam_names.items():
        value = generic[key] if generic[key] is not None else spec.defaults.get(key)
        if own_name in extras and generic[key] is not None:
            raise UserError(f"optimizer '{spec.name}': give either {key} or {own_name}, not both")
        if value is not None:
            kwargs[own_name] = value
    kwargs.update(extras)
    _check_accepted(spec, kwargs)
    if "lr" in spec.hparam_names and spec.hparam_names["lr"] not in kwargs:
        raise UserError(f"optimizer '{spec.name}' has no default learning rate: pass --learning_rate")
    return ResolvedOptimizer(spec, kwargs)


def build(resolved: ResolvedOptimizer, model_or_params: torch.nn.Module | Iterable,
          device: torch.device | None = None) -> torch.optim.Optimizer:
    """The torch optimizer of a resolved spec; biases and norm weights get no weight decay.

    With `device` (where training runs; the parameters may still be on the CPU), the spec's fused/foreach
    step is turned on where that device has the kernel: same update to float rounding, fewer kernel launches.
    """
    spec, kwargs = resolved.spec, dict(resolved.kwargs)
    if device is not None and not {"fused", "foreach"} & kwargs.keys():
        kwargs.update(fast_step_kwargs(spec.fast_step, device))
    groups = param_groups(model_or_params, None, spec.param_routing)
    try:
        optimizer = spec.load_factory()(groups, **kwargs)
    except (ValueError, TypeError) as err:
        # The optimizer's own argument checks (e.g. a beta it does not accept) are still the user's input.
        raise UserError(f"optimizer '{spec.name}' rejected its hyperparameters {kwargs}: {err}") from err
    keep_state_dtypes(optimizer)
    return optimizer


def keep_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Loaded state keeps the dtypes it was saved with.

    torch's load_state_dict casts floating-point state to the parameter's dtype, so state an optimizer keeps in
    bf16 on fp32 parameters (Prodigy+ScheduleFree's p0 and s) came back as fp32 and a resume drifted.
    """
    saved: dict[Any, dict[str, torch.dtype]] = {}

    def record(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in opt.param_groups for p in group["params"]]
        saved.clear()
        for index, param in zip(ids, params):
            entry = state_dict["state"].get(index, {})
            saved[param] = {k: v.dtype for k, v in entry.items() if isinstance(v, torch.Tensor)}

    def restore(opt: torch.optim.Optimizer) -> None:
        for param, dtypes in saved.items():
            state = opt.state.get(param, {})
            for key, dtype in dtypes.items():
                if isinstance(state.get(key), torch.Tensor) and state[key].dtype != dtype:
                    state[key] = state[key].to(dtype)
        saved.clear()

    optimizer.register_load_state_dict_pre_hook(record)
    optimizer.register_load_state_dict_post_hook(restore)


def resolved_hparams(name: str, **hparams: Any) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with, in its own names (None = the spec's default)."""
    return dict(resolve(name, {k: v for k, v in hparams.items() if v is not None or k not in GENERIC_HPARAMS}).kwargs)


def create_optimizer(model_or_params: torch.nn.Module | Iterable, name: str, **hparams: Any) -> torch.optim.Optimizer:
    """A torch optimizer by registry name or import path, from generic and own hyperparameters."""
    return build(resolve(name, {k: v for k, v in hparams.items() if v is not None or k not in GENERIC_HPARAMS}),
                 model_or_params)
