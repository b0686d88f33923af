"""Arms of a comparison: an arm is one full set of training settings, run over seeds.

Runs are seeds of the same arm only when every setting that defines the training is equal; everything else
(where the run is written, how it is tracked) is listed in NOT_ARM_KEYS. Arms are never merged, and an arm's
label names exactly the settings that distinguish it from the other arms of the same comparison.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from diffusers_optim.config import RECORD_FIELDS, TrainConfig, coerce_value, field_types

# Runs differing only in these are seeds of one arm: the seed, where and how a run is recorded (config.RECORD_FIELDS),
# and how fast, not what: the same maths to float rounding, and one mode for every arm (--grid refuses them).
NOT_ARM_KEYS = frozenset({"seed", *RECORD_FIELDS, "torch_compile", "compile_mode", "channels_last", "allow_tf32",
                          "sample_batch_size"})
SHORT_NAMES = {"learning_rate": "lr"}


def default_settings() -> dict[str, Any]:
    return dataclasses.asdict(TrainConfig())


def settings_from_args(args: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full training config that trainer flags (`--key value` pairs, as compare plans them) describe,
    over `base` (a sibling run's recorded config) or the defaults."""
    types, settings = field_types(), dict(base or default_settings())
    for key, value in zip(args[::2], args[1::2]):
        key = key.removeprefix("--")
        if key in types:
            settings[key] = coerce_value(key, value, types[key])
    return settings


def arm_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without the keys that do not define its arm."""
    settings = {k: v for k, v in config.items() if k not in NOT_ARM_KEYS}
    if seed_derived_init(config):
        settings.pop("init_seed")  # like the seed itself: seeds of one arm start from their own weights
    return settings


def seed_derived_init(config: dict[str, Any]) -> bool:
    """Whether the recorded (resolved) init_seed is the one the run's seed implies (config.resolved_init_seed):
    --seed without --fixed_init, or 0 with it. (An explicit --init_seed equal to that value reads the same.)"""
    if "init_seed" not in config:
        return False
    implied = 0 if config.get("fixed_init") else config.get("seed")
    return config["init_seed"] in (None, implied)


def arm_identity(config: dict[str, Any]) -> str:
    """A hashable identity: equal for two runs exactly when they are seeds of one arm."""
    return json.dumps(arm_settings(config), sort_keys=True, default=str)


def varying_keys(settings: list[dict[str, Any]]) -> list[str]:
    """Keys (in first-seen order) whose value is not the same in every settings dict."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]


def follows_optimizer(key: str, settings: list[dict[str, Any]]) -> bool:
    """True when the optimizer alone fixes this key's value (e.g. each optimizer's own lr)."""
    seen: dict[str, str] = {}
    for s in settings:
        value = json.dumps(s.get(key), default=str)
        if seen.setdefault(str(s.get("optimizer")), value) != value:
            return False
    return True


def fmt_setting(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def arm_labels(settings: list[dict[str, Any]]) -> list[str]:
    """One label per arm naming what distinguishes it: `adamw lr_warmup_steps=100`, `adam_beta1=0.5`.

    The optimizer is named when optimizers differ; a setting each optimizer fixes on its own (its lr, its
    momentum) is left to the table's columns, so `adamw` vs `sgd` stays two words.
    """
    keys = varying_keys(settings)
    by_optimizer = "optimizer" in keys
    shown = [k for k in keys if k != "optimizer" and not (by_optimizer and follows_optimizer(k, settings))]
    labels = []
    for s in settings:
        parts = [str(s.get("optimizer"))] if by_optimizer or not shown else []
        parts += [f"{SHORT_NAMES.get(k, k)}={fmt_setting(s.get(k))}" for k in shown]
        labels.append(" ".join(parts))
    if len(set(labels)) < len(labels):  # only if two arms differ in a way the rule above hides
        labels = [
            " ".join(f"{SHORT_NAMES.get(k, k)}={fmt_setting(s.get(k))}" for k in keys) for s in settings
        ]
    return labels
