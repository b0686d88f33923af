"""The optimizer registry: an object holding one OptimizerSpec per name (timm's OptimizerRegistry pattern).

`default_registry()` is filled once from the built-in entries and the installed plug-ins (entry-point group
`diffusers_optim.optimizers`); the module-level functions use it. Tests build a fresh `OptimizerRegistry()`.
Import order has no circle: spec <- groups <- builtin, importpath <- registry.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import logging
from collections.abc import Iterable

from diffusers_optim.errors import unknown_choice
from diffusers_optim.optim.builtin import BUILTIN_SPECS
from diffusers_optim.optim.importpath import looks_like_import_path, spec_for_import_path
from diffusers_optim.optim.spec import EXTRA_INSTALL, GENERIC_HPARAMS, OptimizerSpec, ParamRouting

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "diffusers_optim.optimizers"
__all__ = ["ENTRY_POINT_GROUP", "EXTRA_INSTALL", "GENERIC_HPARAMS", "OptimizerRegistry", "OptimizerSpec",
           "ParamRouting", "default_registry", "get_spec", "list_optimizers", "register_optimizer"]


class OptimizerRegistry:
    """Specs by name and alias; a name or alias can be registered once."""

    def __init__(self, specs: Iterable[OptimizerSpec] = ()) -> None:
        self._specs: dict[str, OptimizerSpec] = {}
        self._aliases: dict[str, str] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: OptimizerSpec) -> OptimizerSpec:
        """Add a spec; a name or alias that is already taken is an error."""
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"register expects an OptimizerSpec, got {type(spec).__name__}")
        for key in (spec.name, *spec.aliases):
            if key in self._specs or key in self._aliases:
                owner = self._aliases.get(key, key)
                raise ValueError(f"optimizer name '{key}' of '{spec.name}' is already registered by '{owner}'")
        self._specs[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.name
        return spec

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by an fnmatch pattern (e.g. 'adam*')."""
        names = sorted(self._specs)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def find(self, name: str) -> OptimizerSpec | None:
        """The spec registered under `name` or an alias (case-insensitive), else None."""
        for key in (name, str(name).strip().lower()):
            if key in self._specs:
                return self._specs[key]
            if key in self._aliases:
                return self._specs[self._aliases[key]]
        return None

    def get(self, name: str) -> OptimizerSpec:
        """The spec for `name`, or for the class at an import path; an unknown name lists the valid ones."""
        spec = self.find(name)
        if spec is None and looks_like_import_path(str(name)):
            return spec_for_import_path(str(name))
        if spec is None:
            raise unknown_choice("optimizer", str(name), [*self._specs, *self._aliases])
        return spec

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def copy(self) -> OptimizerRegistry:
        return OptimizerRegistry(self._specs.values())

    def load_plugins(self, entry_points: Iterable[importlib.metadata.EntryPoint]) -> None:
        """Register the specs of installed plug-ins; a broken plug-in is a warning, not a crash."""
        for entry_point in entry_points:
            try:
                loaded = entry_point.load()
                if callable(loaded) and not isinstance(loaded, OptimizerSpec):
                    loaded = loaded()
                for spec in [loaded] if isinstance(loaded, OptimizerSpec) else list(loaded):
                    self.register(spec)
            except Exception as err:  # noqa: BLE001 - third-party code may fail in any way
                logger.warning("optimizer plug-in '%s' (%s) was not loaded: %s: %s",
                               entry_point.name, entry_point.value, type(err).__name__, err)


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """Installed plug-ins of the optimizer entry-point group."""
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


_default: OptimizerRegistry | None = None


def default_registry() -> OptimizerRegistry:
    """The process-wide registry: built-in entries first (theirs are the names taken), then plug-ins."""
    global _default
    if _default is None:
        _default = OptimizerRegistry(BUILTIN_SPECS)
        _default.load_plugins(_entry_points())
    return _default


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a spec to the default registry."""
    return default_registry().register(spec)


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Sorted names of registered optimizers, optionally filtered by an fnmatch pattern (e.g. 'adam*')."""
    return default_registry().names(pattern)


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under `name` or one of its aliases."""
    return default_registry().get(name)
