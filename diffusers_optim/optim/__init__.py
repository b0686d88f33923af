"""Optimizers by name: the registry, its built-in entries, parameter groups and state memory.

Importing this package imports no optional optimizer package; each is imported when first built.
"""

from diffusers_optim.optim.args import parse_optimizer_args
from diffusers_optim.optim.factory import create_optimizer, resolved_hparams
from diffusers_optim.optim.groups import muon_routing, param_groups
from diffusers_optim.optim.memory import optimizer_state_bytes
from diffusers_optim.optim.registry import (
    ENTRY_POINT_GROUP,
    GENERIC_HPARAMS,
    OptimizerSpec,
    get_spec,
    list_optimizers,
    register_optimizer,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "GENERIC_HPARAMS",
    "OptimizerSpec",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "muon_routing",
    "optimizer_state_bytes",
    "param_groups",
    "parse_optimizer_args",
    "register_optimizer",
    "resolved_hparams",
]
