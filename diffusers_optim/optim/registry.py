"""The optimizer registry: one frozen OptimizerSpec per optimizer, looked up by name or alias.

Optional packages are imported only when an optimizer that needs them is built. Third-party
optimizers register through the entry-point group `diffusers_optim.optimizers`.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from diffusers_optim.errors import UserError, unknown_choice

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "diffusers_optim.optimizers"
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
    needs_cuda: bool = False  # its kernels run on CUDA only (torchao low-bit states): an error on CPU
    lr_is_multiplier: bool = False  # Prodigy-style: the optimizer finds the step size, lr ~1.0 scales it
    param_routing: ParamRouting | None = None  # Muon-style: which parameters go to which update rule
    effective_lr_fn: Callable[[torch.optim.Optimizer], float | None] | None = None

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
        """The module to import for a dotted-path factory."""
        return self.factory.rpartition(".")[0] if isinstance(self.factory, str) else None

    def is_available(self) -> bool:
        """True if the optimizer's package is installed (checked without importing it)."""
        module = self.module_name
        return module is None or importlib.util.find_spec(module.split(".")[0]) is not None

    def load_factory(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class, importing its package now; a missing package is a UserError."""
        if not isinstance(self.factory, str):
            return self.factory
        if not self.is_available():
            raise UserError(self.missing_package_message())
        module_name, _, attr = self.factory.rpartition(".")
        return getattr(importlib.import_module(module_name), attr)

    def missing_package_message(self) -> str:
        package = self.package or self.module_name
        how = f"{EXTRA_INSTALL} (or pip install {package})" if self.extra else f"pip install {package}"
        return f"optimizer '{self.name}' needs the package '{package}', which is not installed: {how}"

    def effective_lr(self, optimizer: torch.optim.Optimizer) -> float | None:
        """The step size the optimizer actually uses where it adapts it (Prodigy: d*lr), else None."""
        return None if self.effective_lr_fn is None else self.effective_lr_fn(optimizer)


_REGISTRY: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}
_builtins_loaded = False
_plugins_loaded = False


def _ensure_builtins() -> None:
    """Register the built-in entries once (before any other registration, so theirs are the names taken)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("diffusers_optim.optim.builtin")


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a spec to the registry; a name or alias that is already taken is an error."""
    if not isinstance(spec, OptimizerSpec):
        raise TypeError(f"register_optimizer expects an OptimizerSpec, got {type(spec).__name__}")
    _ensure_builtins()
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            owner = _ALIASES.get(key, key)
            raise ValueError(f"optimizer name '{key}' of '{spec.name}' is already registered by '{owner}'")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """Installed plug-ins of the optimizer entry-point group (tests monkeypatch this)."""
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_plugin(entry_point: importlib.metadata.EntryPoint) -> None:
    loaded = entry_point.load()
    if callable(loaded) and not isinstance(loaded, OptimizerSpec):
        loaded = loaded()
    specs = [loaded] if isinstance(loaded, OptimizerSpec) else list(loaded)
    for spec in specs:
        register_optimizer(spec)


def load_plugins() -> None:
    """Register the specs of installed plug-ins, once; a broken plug-in is a warning, not a crash."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in _entry_points():
        try:
            _load_plugin(entry_point)
        except Exception as err:  # noqa: BLE001 - third-party code may fail in any way
            logger.warning(
                "optimizer plug-in '%s' (%s) was not loaded: %s: %s",
                entry_point.name,
                entry_point.value,
                type(err).__name__,
                err,
            )


def _ensure_loaded() -> None:
    _ensure_builtins()
    load_plugins()


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Sorted names of registered optimizers, optionally filtered by an fnmatch pattern (e.g. 'adam*')."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under `name` or one of its aliases."""
    _ensure_loaded()
    for key in (name, str(name).strip().lower()):
        if key in _REGISTRY:
            return _REGISTRY[key]
        if key in _ALIASES:
            return _REGISTRY[_ALIASES[key]]
    raise unknown_choice("optimizer", str(name), [*_REGISTRY, *_ALIASES])
