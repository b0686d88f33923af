"""Any optimizer class by import path: `torch.optim.NAdam` or `my_pkg.module:MyOpt` (as kohya's scripts accept).

The class becomes an OptimizerSpec built from its constructor's signature: the generic hyperparameters it takes
(lr, betas, eps, weight_decay, momentum) are mapped by name, its own defaults are the defaults, and train()/eval()
methods mark it as schedule-free. Nothing here branches on a name.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from diffusers_optim.errors import UserError
from diffusers_optim.optim.spec import GENERIC_HPARAMS, OptimizerSpec, split_import_path

SIMPLE_DEFAULTS = (bool, int, float, str, tuple, type(None))


def looks_like_import_path(name: str) -> bool:
    """'pkg.mod.Class' or 'pkg.mod:Class': a dot or a colon and identifiers only."""
    module, attr = split_import_path(name)
    parts = [*module.split("."), *attr.split(".")]
    return bool(module) and bool(attr) and all(part.isidentifier() for part in parts)


def import_optimizer_class(path: str) -> type:
    """The class at `path`; a path that does not import or is not an optimizer class is a UserError."""
    module_name, attr = split_import_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--optimizer {path}: cannot import module '{module_name}' ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--optimizer {path}: module '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise UserError(f"--optimizer {path}: {obj!r} is not a torch.optim.Optimizer subclass")
    return obj


def spec_for_import_path(path: str) -> OptimizerSpec:
    """An OptimizerSpec for the optimizer class at `path`, from its constructor's signature."""
    cls = import_optimizer_class(path)
    params = list(inspect.signature(cls).parameters.values())[1:]  # drop `params`
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "lr" not in named:
        raise UserError(f"--optimizer {path}: its constructor takes no 'lr', which the LR schedule needs")
    defaults = {name: p.default for name, p in named.items()
                if p.default is not p.empty and isinstance(p.default, SIMPLE_DEFAULTS)}
    train_eval = callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None))
    module_name = split_import_path(path)[0]
    return OptimizerSpec(
        name=path,
        factory=cls,
        description=f"{cls.__name__} from {module_name}, by import path",
        package=None if module_name.split(".")[0] == "torch" else module_name.split(".")[0],
        defaults={k: v for k, v in defaults.items() if k in GENERIC_HPARAMS},
        defaults_source=f"the defaults of {cls.__qualname__}.__init__",
        hparam_names={name: name for name in GENERIC_HPARAMS if name in named},
        needs_train_eval=train_eval,
        schedule_free=train_eval,  # train()/eval() on an optimizer: schedule-free's contract
    )
