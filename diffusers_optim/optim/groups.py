"""Parameter groups: no weight decay on biases and norm weights, and Muon-style routing by shape and role."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from diffusers_optim.optim.registry import ParamRouting

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
