"""Arms of a comparison: an arm is one full set of training settings, run over seeds.

Runs are seeds of the same arm only when every setting that defines the training is equal; everything else
(where the run is written, how it is tracked) is listed in NOT_ARM_KEYS. Arms are never merged, and an arm's
name (arm_names) says the optimizer and exactly the settings that distinguish it from the other arms of the same
comparison; plan.json, the run folders (arm_slugs), the report, the summary, the live view and W&B all use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from diffusers_optim.config import OPTIMIZER_FIELDS, RECORD_FIELDS, TrainConfig, coerce_value, field_types
from diffusers_optim.errors import UserError

# Runs differing only in these are seeds of one arm: the seed, where and how a run is recorded (config.RECORD_FIELDS),
# and how fast, not what: the same maths to float rounding, and one mode for every arm (--grid refuses them).
NOT_ARM_KEYS = frozenset({"seed", *RECORD_FIELDS, "torch_compile", "compile_mode", "channels_last", "allow_tf32",
                          "sample_batch_size"})
# How a name writes a setting: the generic Adam flags by the names Adam gives them (`adam beta1=0.5`)
SHORT_NAMES = {"learning_rate": "lr", "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_epsilon": "eps",
               "adam_weight_decay": "weight_decay"}
HPARAM = "optimizer_args."  # in naming_settings: one hyperparameter of --optimizer_args (`optimizer_args.betas`)


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


def fmt_setting(value: Any, exact: bool = False) -> str:
    """A setting's value in a name: 6 significant digits (all of them when `exact`), tuples as written in a spec."""
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(fmt_setting(v, exact) for v in value) + ")"
    if isinstance(value, float):
        return repr(value) if exact else f"{value:g}"
    return str(value)


def naming_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """An arm's settings as its name reads them: --optimizer_args split into its hyperparameters (`betas`, `eps`), so
    a name shows the one hyperparameter that differs, not the whole resolved string."""
    from diffusers_optim.optim import parse_optimizer_args  # here: the optim package imports torch

    named: dict[str, Any] = {}
    for key, value in settings.items():
        if key != "optimizer_args" or not value:
            named[key] = value
            continue
        try:
            named.update({HPARAM + k: v for k, v in parse_optimizer_args(value).items()})
        except UserError:  # edited by hand into something unreadable: named as the whole string
            named[key] = value
    return named


def setting_text(key: str, value: Any, exact: bool = False) -> str:
    name = key.removeprefix(HPARAM)
    return f"{SHORT_NAMES.get(name, name)}={fmt_setting(value, exact)}"


def name_of(settings: dict[str, Any], keys: list[str], exact: bool = False) -> str:
    """The optimizer, then each key's setting; a hyperparameter the arm's optimizer does not take is left out."""
    keys = [k for k in keys if k in settings or not k.startswith(HPARAM)]
    return " ".join([str(settings.get("optimizer")), *(setting_text(k, settings.get(k), exact) for k in keys)])


def arm_names(settings: list[dict[str, Any]]) -> list[str]:
    """One short name per arm: the optimizer, then only the settings that differ between the comparison's arms
    (`adam betas=(0.5,0.999)` vs `adam betas=(0.9,0.999)`, `adamw lr_warmup_steps=100`, `adam beta1=0.5`).

    An optimizer setting each optimizer fixes on its own (its lr, its eps) is left out when optimizers differ, so
    `adamw` vs `sgd` stays two words. Arms are never merged: names that collide get what tells those arms apart.
    """
    named = [naming_settings(s) for s in settings]
    keys = varying_keys(named)
    by_optimizer = "optimizer" in keys
    shown = [k for k in keys if k != "optimizer" and not (by_optimizer and own_setting(k, named))]
    names = [name_of(s, shown) for s in named]
    return distinguish(names, named, shown)


def own_setting(key: str, named: list[dict[str, Any]]) -> bool:
    """An optimizer setting (its lr, a hyperparameter) each optimizer of the comparison sets once, its own way;
    a training flag (warmup, clipping) that differs is always named."""
    return (key in OPTIMIZER_FIELDS or key.startswith(HPARAM)) and follows_optimizer(key, named)


def distinguish(names: list[str], named: list[dict[str, Any]], shown: list[str]) -> list[str]:
    """Names shared by several arms get the settings that differ among those arms, then exact values, then a
    number: the short rule above can hide a difference (an optimizer's own lr that two arms of it do not share)."""
    names = list(names)
    for exact in (False, True):
        for name in {n for n in names if names.count(n) > 1}:
            group = [i for i, n in enumerate(names) if n == name]
            extra = [k for k in varying_keys([named[i] for i in group]) if k not in shown and k != "optimizer"]
            keys = [k for k in varying_keys(named) if k in shown or k in extra]
            for i in group:
                names[i] = name_of(named[i], keys, exact)
    for name in {n for n in names if names.count(n) > 1}:  # settings that read alike (lr=1e-3 vs lr=0.001)
        for number, i in enumerate((i for i, n in enumerate(names) if n == name), 1):
            names[i] = f"{name} #{number}"
    return names


def differing_settings(settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, the settings that differ between the arms, as the names read them (`{"betas": (0.5, 0.999)}`)."""
    named = [naming_settings(s) for s in settings]
    keys = varying_keys(named)
    return [{k.removeprefix(HPARAM): s.get(k) for k in keys if k in s or not k.startswith(HPARAM)} for s in named]


def arm_slug(name: str) -> str:
    """A folder-safe form of an arm's name: `adam betas=(0.5,0.999)` -> `adam-betas=0.5-0.999`."""
    text = re.sub(r"[^A-Za-z0-9_.=()-]+", "-", name).replace("(", "").replace(")", "")
    return re.sub(r"-{2,}", "-", text).strip("-") or "arm"


def arm_slugs(names: list[str]) -> list[str]:
    """The arms' folder prefixes, derived from their names; names that slug alike get -1, -2, ..., each suffix
    checked against every slug already taken (["a", "a", "a-2"] must not give "a-2" twice: one folder, two arms)."""
    slugs = [arm_slug(n) for n in names]
    taken = {s for s in slugs if slugs.count(s) == 1}
    out = []
    for s in slugs:
        if slugs.count(s) == 1:
            out.append(s)
            continue
        k = 1
        while f"{s}-{k}" in taken:
            k += 1
        taken.add(f"{s}-{k}")
        out.append(f"{s}-{k}")
    return out
