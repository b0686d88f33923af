"""Optimizers by name or import path: the registry, its built-in entries, resolving, parameter groups, state memory.

Importing this package imports no optional optimizer package; each is imported when first built.
"""

from diffusers_optim.optim.args import format_optimizer_args, parse_optimizer_args
from diffusers_optim.optim.factory import (
    ResolvedOptimizer,
    build,
    create_optimizer,
    resolve,
    resolved_hparams,
)
from diffusers_optim.optim.groups import muon_routing, param_groups
from diffusers_optim.optim.memory import optimizer_state_bytes
from diffusers_optim.optim.registry import (
    ENTRY_POINT_GROUP,
    GENERIC_HPARAMS,
    OptimizerRegistry,
    OptimizerSpec,
    default_registry,
    get_spec,
    list_optimizers,
    register_optimizer,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "GENERIC_HPARAMS",
    "OptimizerRegistry",
    "OptimizerSpec",
    "ResolvedOptimizer",
    "build",
    "create_optimizer",
    "default_registry",
    "format_optimizer_args",
    "get_spec",
    "list_optimizers",
    "muon_routing",
    "optimizer_state_bytes",
    "param_groups",
    "parse_optimizer_args",
    "register_optimizer",
    "resolve",
    "resolved_hparams",
]
