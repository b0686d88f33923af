"""Build an optimizer by name: generic hyperparameters mapped onto its own arguments, checked before use."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch

from diffusers_optim.errors import UserError, closest_match
from diffusers_optim.optim.groups import param_groups
from diffusers_optim.optim.registry import GENERIC_HPARAMS, OptimizerSpec, get_spec

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


def resolved_hparams(
    name: str,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, ...] | None = None,
    momentum: float | None = None,
    eps: float | None = None,
    **extras: Any,
) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with, in its own names (None = the spec's default)."""
    spec = get_spec(name)
    generic = dict(lr=lr, weight_decay=weight_decay, betas=betas, momentum=momentum, eps=eps)
    generic["betas"] = _fill_betas(spec, betas)
    _warn_ignored(spec, generic)
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
    return kwargs


def create_optimizer(
    model_or_params: torch.nn.Module | Iterable,
    name: str,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, ...] | None = None,
    momentum: float | None = None,
    eps: float | None = None,
    **extras: Any,
) -> torch.optim.Optimizer:
    """A torch optimizer from the registry; biases and norm weights get no weight decay."""
    spec = get_spec(name)
    kwargs = resolved_hparams(
        spec.name, lr=lr, weight_decay=weight_decay, betas=betas, momentum=momentum, eps=eps, **extras
    )
    groups = param_groups(model_or_params, None, spec.param_routing)
    try:
        return spec.load_factory()(groups, **kwargs)
    except (ValueError, TypeError) as err:
        # The optimizer's own argument checks (e.g. a beta it does not accept) are still the user's input.
        raise UserError(f"optimizer '{spec.name}' rejected its hyperparameters {kwargs}: {err}") from err
