"""OptimizerSpec: everything the trainer needs to know about one optimizer, as data (timm's OptimInfo).

What differs between optimizers is a flag here, never a branch on a name in the trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from diffusers_optim.errors import UserError

EXTRA_INSTALL = "pip install 'diffusers-optim[optimizers]'"
# Hyperparameters every optimizer is asked about by the same name (the trainer's flags).
GENERIC_HPARAMS = ("lr", "weight_decay", "betas", "momentum", "eps")

# (parameter name, parameter) -> extra keys for that parameter's group, e.g. {"use_muon": True}.
ParamRouting = Callable[[str, torch.Tensor], Mapping[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the trainer needs to know about one optimizer; what differs is a flag, not a branch."""

    name: str
    factory: type | Callable[..., torch.optim.Optimizer] | str  # a class, or "module.Class" imported on use
    description: str  # one line
    package: str | None = None  # pip package when not a core dependency (None: torch/transformers)
    extra: str | None = None  # the diffusers-optim extra that installs `package`
    defaults: Mapping[str, Any] = field(default_factory=dict)  # generic names and the optimizer's own extras
    defaults_source: str = ""  # where each default comes from
    hparam_names: Mapping[str, str] = field(default_factory=dict)  # generic name -> the optimizer's argument
    aliases: tuple[str, ...] = ()
    needs_train_eval: bool = False  # schedule-free: optimizer.train()/.eval() around evaluation and saving
    schedule_free: bool = False  # averages its iterates instead of decaying the lr: constant LR by default
    import_name: str | None = None  # module whose presence means `package` is installed (default: the factory's)
    exact_resume: bool = True  # False: some of its state lives outside state_dict, a resume is close, not exact
    needs_cuda: bool = False  # its kernels run on CUDA only (torchao low-bit states): an error on CPU
    lr_is_multiplier: bool = False  # Prodigy-style: the optimizer finds the step size, lr ~1.0 scales it
    param_routing: ParamRouting | None = None  # Muon-style: which parameters go to which update rule
    effective_lr_fn: Callable[[torch.optim.Optimizer], float | None] | None = None
    # optimizer-state key of the first-moment (momentum) buffer in the weights' own basis, e.g. "exp_avg";
    # the gradient probes read it for grad_t/momentum_cos (None: no such buffer, or not in that basis)
    first_moment_state: str | None = None
    # "fused" / "foreach": the keyword that turns on torch's one-kernel step (instead of a Python loop over the
    # tensors); build() sets it where the device has the kernel, unless the user gave fused= or foreach=
    fast_step: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.hparam_names) - set(GENERIC_HPARAMS)
        if unknown:
            raise ValueError(
                f"optimizer spec '{self.name}': unknown generic hyperparameters {sorted(unknown)}"
            )
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "hparam_names", MappingProxyType(dict(self.hparam_names)))

    @property
    def has_betas(self) -> bool:
        return "betas" in self.hparam_names

    @property
    def has_momentum(self) -> bool:
        return "momentum" in self.hparam_names

    @property
    def has_eps(self) -> bool:
        return "eps" in self.hparam_names

    @property
    def has_weight_decay(self) -> bool:
        return "weight_decay" in self.hparam_names

    @property
    def module_name(self) -> str | None:
        """The module to import for a path factory ("module.Class" or "module:Class")."""
        return split_import_path(self.factory)[0] if isinstance(self.factory, str) else None

    def is_available(self) -> bool:
        """True if the optimizer's package is installed (checked without importing it)."""
        module = self.import_name or self.module_name
        return module is None or importlib.util.find_spec(module.split(".")[0]) is not None

    def load_factory(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class, importing its package now; a missing package is a UserError."""
        if not self.is_available():
            raise UserError(self.missing_package_message())
        if not isinstance(self.factory, str):
            return self.factory
        module_name, attr = split_import_path(self.factory)
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def missing_package_message(self) -> str:
        package = self.package or self.module_name
        extra = f"pip install 'diffusers-optim[{self.extra}]'"
        how = f"{extra} (or pip install {package})" if self.extra else f"pip install {package}"
        return f"optimizer '{self.name}' needs the package '{package}', which is not installed: {how}"

    def effective_lr(self, optimizer: torch.optim.Optimizer) -> float | None:
        """The step size the optimizer actually uses where it adapts it (Prodigy: d*lr), else None."""
        return None if self.effective_lr_fn is None else self.effective_lr_fn(optimizer)


def split_import_path(path: str) -> tuple[str, str]:
    """"pkg.mod:Class" or "pkg.mod.Class" -> ("pkg.mod", "Class")."""
    if ":" in path:
        module, _, attr = path.partition(":")
        return module, attr
    module, _, attr = path.rpartition(".")
    return module, attr
