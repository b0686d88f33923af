"""Optimizer-state memory, measured from the tensors actually allocated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (per-parameter state and tensors kept in param groups), each storage once."""
    group_extras = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    seen: dict[tuple[str, int], int] = {}
    for tensor in _tensors([list(optimizer.state.values()), group_extras]):
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
