"""Parameter groups: no weight decay on biases and norm weights, and Muon-style routing by shape and role."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from diffusers_optim.optim.spec import ParamRouting

# Muon is for hidden weight matrices; the common advice (Keller Jordan's Muon notes, Moonlight) keeps the
# input layer, the output layer and embeddings on AdamW. These are their names in diffusers' UNets.
MUON_ADAMW_PATTERNS = ("conv_in.*", "conv_out.*", "*class_embedding.*", "*embed_tokens.*", "*lm_head.*")


def uses_weight_decay(param: torch.Tensor) -> bool:
    """Biases and normalization weights (ndim <= 1) never get weight decay."""
    return param.ndim > 1


def muon_routing(name: str, param: torch.Tensor) -> dict[str, Any]:
    """Hidden matrices and conv kernels (flattened to 2-D) go to Muon; the rest to its AdamW fallback."""
    is_io_layer = any(fnmatch.fnmatchcase(name, pattern) for pattern in MUON_ADAMW_PATTERNS)
    return {"use_muon": param.ndim >= 2 and not is_io_layer}


# How routed groups are named in logged metrics (`train/lr/muon`, `train/lr/adamw`): (routing key, value) -> label.
ROUTE_LABELS = {("use_muon", True): "muon", ("use_muon", False): "adamw"}


def route_label(group: Mapping[str, Any], routing_keys: Iterable[str]) -> str:
    """A routed parameter group's short name, from the keys its routing function set."""
    parts = [ROUTE_LABELS.get((key, group.get(key)), f"{key}={group.get(key)}") for key in sorted(routing_keys)]
    return "-".join(parts)


def routing_keys(model_or_params: torch.nn.Module | Iterable, routing: ParamRouting | None) -> list[str]:
    """The group keys a routing function sets (e.g. ["use_muon"]); [] without routing."""
    if routing is None:
        return []
    return sorted({key for name, param in named_trainable_params(model_or_params) for key in routing(name, param)})


def group_lrs(param_groups: list[Mapping[str, Any]], lrs: list[float], base_lr: float,
              routing_keys: Iterable[str] = ()) -> dict[str, float]:
    """`train/lr` from the groups the run's --learning_rate sets, and each routed group's own lr.

    Muon's AdamW fallback comes first among its groups with its own lr (3e-4): the first group's lr would show
    that instead of the Muon lr the run is named after.
    """
    initial = [group.get("initial_lr", group["lr"]) for group in param_groups]
    main = next((i for i, lr in enumerate(initial) if math.isclose(lr, base_lr, rel_tol=1e-9)), 0)
    record = {"train/lr": lrs[main]}
    keys = list(routing_keys)
    if keys:
        for group, lr in zip(param_groups, lrs):
            record.setdefault(f"train/lr/{route_label(group, keys)}", lr)
    return record


def named_trainable_params(model_or_params: torch.nn.Module | Iterable) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs of a module or of an iterable of parameters or (name, parameter) pairs."""
    if isinstance(model_or_params, torch.nn.Module):
        pairs = list(model_or_params.named_parameters())
    else:
        pairs = [item if isinstance(item, tuple) else ("", item) for item in model_or_params]
    return [(name, p) for name, p in pairs if p.requires_grad]


def param_groups(
    model_or_params: torch.nn.Module | Iterable,
    weight_decay: float | None = None,
    routing: ParamRouting | None = None,
) -> list[dict[str, Any]]:
    """Groups for a torch optimizer: decayed (ndim > 1) and not decayed (ndim <= 1), split again by `routing`.

    weight_decay=None leaves the decayed groups to the optimizer's own `weight_decay` argument.
    An iterable of ready-made group dicts is returned unchanged.
    """
    items = list(model_or_params) if not isinstance(model_or_params, torch.nn.Module) else model_or_params
    if isinstance(items, list) and items and all(isinstance(item, Mapping) for item in items):
        return [dict(group) for group in items]
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named_trainable_params(items):
        decay = uses_weight_decay(param)
        extra = dict(routing(name, param)) if routing else {}
        key = (decay, tuple(sorted(extra.items())))
        if key not in groups:
            group: dict[str, Any] = {"params": [], **extra}
            if not decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
            groups[key] = group
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters to optimize")
    return list(groups.values())
