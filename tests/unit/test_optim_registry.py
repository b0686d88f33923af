"""The optimizer registry: lookup, validation, hyperparameter mapping, groups, plug-ins, state memory."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import types

import pytest
import torch

from diffusers_optim.errors import UserError
from diffusers_optim.models import build_unet
from diffusers_optim.optim import (
    OptimizerRegistry,
    OptimizerSpec,
    create_optimizer,
    default_registry,
    get_spec,
    list_optimizers,
    optimizer_state_bytes,
    param_groups,
    parse_optimizer_args,
    register_optimizer,
    registry,
    resolve,
    resolved_hparams,
)

REQUIRED = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adafactor", "lion", "prodigy", "adamw_schedulefree",
            "adamw_8bit", "muon", "soap", "came", "adopt", "ademamix", "nadam", "radam", "stable_adamw",
            "prodigy_plus_schedulefree", "sgd_schedulefree", "radam_schedulefree", "psgd_kron", "adamw_ao_8bit",
            "adamw_ao_4bit"]  # fmt: skip


@pytest.fixture
def tiny_unet() -> torch.nn.Module:
    return build_unet("tiny", 16, 1, init_seed=0)


@pytest.fixture
def clean_registry(monkeypatch):
    """The default registry swapped for a copy, so what a test registers is forgotten after it."""
    monkeypatch.setattr(registry, "_default", registry.default_registry().copy())


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model(x, torch.tensor([1, 900])).sample.square().mean().backward()
    optimizer.step()


# ---- lookup -----------------------------------------------------------------------------------


def test_required_entries_and_pattern() -> None:
    names = list_optimizers()
    assert set(REQUIRED) <= set(names) and names == sorted(names)
    assert list_optimizers("adam*") == [n for n in names if n.startswith("adam")]
    assert "sgd" not in list_optimizers("adam*")


def test_aliases_resolve_and_case_is_ignored() -> None:
    assert get_spec("adamw_torch").name == "adamw"
    assert get_spec("adamw_bnb_8bit").name == "adamw_8bit"
    assert get_spec("ADAMW").name == "adamw"


def test_unknown_name_lists_choices_and_closest() -> None:
    with pytest.raises(UserError, match=r"unknown optimizer 'adamww'.*Did you mean 'adamw'.*Valid: .*sgd"):
        get_spec("adamww")


def test_lion_uses_the_declared_package() -> None:
    spec = get_spec("lion")
    assert spec.package == "lion-pytorch" and spec.factory.startswith("lion_pytorch.")
    pytest.importorskip("lion_pytorch")
    assert type(create_optimizer(torch.nn.Linear(2, 2), "lion")).__module__.startswith("lion_pytorch")


def test_capability_flags() -> None:
    assert get_spec("adamw_schedulefree").needs_train_eval and not get_spec("adamw").needs_train_eval
    assert get_spec("prodigy").lr_is_multiplier and get_spec("prodigy").defaults["lr"] == 1.0
    assert get_spec("muon").param_routing is not None
    assert get_spec("adamw").has_betas and not get_spec("sgd").has_betas and get_spec("sgd").has_momentum
    assert get_spec("adamw").effective_lr(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())) is None
    for name in list_optimizers():
        spec = get_spec(name)
        assert spec.description and "\n" not in spec.description and spec.defaults_source, name


def test_prodigy_effective_lr_is_d_times_lr(tiny_unet) -> None:
    pytest.importorskip("prodigyopt")
    optimizer = create_optimizer(tiny_unet, "prodigy", lr=0.5)
    one_step(tiny_unet, optimizer)
    group = optimizer.param_groups[0]
    assert get_spec("prodigy").effective_lr(optimizer) == pytest.approx(group["d"] * 0.5)


# ---- registration and plug-ins -----------------------------------------------------------------


def test_register_duplicate_name_or_alias_is_an_error(clean_registry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(OptimizerSpec(name="sgd", factory=torch.optim.SGD, description="again"))
    with pytest.raises(ValueError, match="already registered by 'adamw'"):
        register_optimizer(
            OptimizerSpec(name="x", factory=torch.optim.SGD, description="x", aliases=("adamw_torch",))
        )


def fake_entry_point(name: str, target: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=target, group=registry.ENTRY_POINT_GROUP)


def test_entry_point_plugins_load_and_broken_ones_warn(clean_registry, monkeypatch, caplog) -> None:
    plugin = types.ModuleType("fake_optim_plugin")
    plugin.SPEC = OptimizerSpec(name="plugin_sgd", factory=torch.optim.SGD, description="plug-in SGD",
                                defaults={"lr": 0.1}, hparam_names={"lr": "lr"})  # fmt: skip
    plugin.make_specs = lambda: [OptimizerSpec(name="plugin_adam", factory=torch.optim.Adam, description="a")]
    monkeypatch.setitem(sys.modules, "fake_optim_plugin", plugin)
    entry_points = [fake_entry_point("good", "fake_optim_plugin:SPEC"),
                    fake_entry_point("many", "fake_optim_plugin:make_specs"),
                    fake_entry_point("broken", "no_such_module_xyz:SPEC")]  # fmt: skip
    monkeypatch.setattr(registry, "_entry_points", lambda: entry_points)
    monkeypatch.setattr(registry, "_default", None)  # rebuilt on first use: built-ins, then these plug-ins
    with caplog.at_level(logging.WARNING):
        names = list_optimizers()
    assert {"plugin_sgd", "plugin_adam", "adamw"} <= set(names)
    assert "'broken'" in caplog.text and "no_such_module_xyz" in caplog.text
    optimizer = create_optimizer(torch.nn.Linear(2, 2), "plugin_sgd")
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_missing_package_says_which_extra(clean_registry) -> None:
    register_optimizer(OptimizerSpec(name="ghost", factory="no_such_pkg_xyz.Ghost", package="no-such-pkg",
                                     extra="optimizers", description="absent"))  # fmt: skip
    assert not get_spec("ghost").is_available()
    with pytest.raises(
        UserError, match=r"needs the package 'no-such-pkg'.*pip install 'diffusers-optim\[optimizers\]'"
    ):
        create_optimizer(torch.nn.Linear(2, 2), "ghost")


# ---- hyperparameters -----------------------------------------------------------------------------


def test_generic_names_map_to_own_names() -> None:
    pytest.importorskip("pytorch_optimizer")
    hparams = resolved_hparams("muon", betas=(0.8, 0.9), eps=1e-9, lr=0.01)
    assert hparams["adamw_betas"] == (0.8, 0.9) and hparams["adamw_eps"] == 1e-9 and hparams["lr"] == 0.01
    assert "betas" not in hparams


def test_defaults_fill_what_is_not_given() -> None:
    hparams = resolved_hparams("adamw", lr=3e-4)
    assert hparams == {**get_spec("adamw").defaults, "lr": 3e-4}
    adafactor = resolved_hparams("adafactor")
    assert adafactor["relative_step"] is False and adafactor["scale_parameter"] is False
    assert adafactor["warmup_init"] is False and adafactor["lr"] > 0


@pytest.mark.parametrize("name", list_optimizers())
def test_resolved_hparams_feed_back_unchanged(name: str) -> None:
    """The trainer records resolved_hparams and builds from them: a second pass must not change them."""
    if not get_spec(name).is_available():
        pytest.skip(f"optimizer '{name}' needs the package '{get_spec(name).package}'")
    hparams = resolved_hparams(name, lr=0.5, weight_decay=0.01)
    assert resolved_hparams(name, **hparams) == hparams


def test_one_beta_keeps_the_other_defaults() -> None:
    assert resolved_hparams("adamw", betas=(0.9, None))["betas"] == (0.9, 0.999)
    assert resolved_hparams("adamw", betas=(None, None))["betas"] == get_spec("adamw").defaults["betas"]
    pytest.importorskip("pytorch_optimizer")
    assert resolved_hparams("ademamix", betas=(0.8, 0.99))["betas"] == (0.8, 0.99, 0.9999)
    assert resolved_hparams("ademamix", betas=(None, 0.99))["betas"] == (0.9, 0.99, 0.9999)


def test_a_fresh_registry_is_independent_and_builtins_keep_their_names() -> None:
    fresh = OptimizerRegistry()
    mine = fresh.register(OptimizerSpec(name="sgd", factory=torch.optim.SGD, description="mine",
                                        hparam_names={"lr": "lr"}))
    assert fresh.names() == ["sgd"] and fresh.get("sgd") is mine
    assert get_spec("sgd").description != "mine"  # the default registry is untouched
    with pytest.raises(ValueError, match="already registered"):
        OptimizerRegistry([*default_registry().copy()._specs.values(), mine])
    assert resolve("sgd", {"lr": 0.5}, registry=fresh).kwargs == {"lr": 0.5}


def test_optim_modules_have_no_import_circle() -> None:
    """Every mention of diffusers_optim.optim.X (import statements and importlib strings) forms no cycle."""
    import re
    from pathlib import Path

    folder = Path(registry.__file__).parent
    graph = {p.stem: set(re.findall(r"diffusers_optim\.optim\.(\w+)", p.read_text())) - {p.stem}
             for p in folder.glob("*.py") if p.stem != "__init__"}  # fmt: skip
    done: set[str] = set()
    while len(done) < len(graph):
        ready = [m for m in graph if m not in done and graph[m] <= done | (set(graph[m]) - set(graph))]
        assert ready, f"import circle among {sorted(set(graph) - done)}"
        done.update(ready)
    assert "registry" not in graph["builtin"] | graph["spec"] | graph["groups"]


def test_extras_are_passed_and_parsed_generic_names_bind_as_flags() -> None:
    optimizer = create_optimizer(torch.nn.Linear(2, 2), "sgd", nesterov=True, momentum=0.5, lr=0.3)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.5 and group["lr"] == 0.3
    assert resolved_hparams("adamw", **parse_optimizer_args("betas=(0.9,0.99)"))["betas"] == (0.9, 0.99)
    pytest.importorskip("pytorch_optimizer")
    with pytest.raises(UserError, match="give either betas or adamw_betas"):
        resolved_hparams("muon", betas=(0.9, 0.9), adamw_betas=(0.8, 0.9))


def test_ignored_generic_flag_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        hparams = resolved_hparams("sgd", betas=(0.9, 0.99))
        assert "betas" not in resolved_hparams("sgd", betas=(0.9, None))  # --adam_beta1 alone: ignored, not checked
    assert "betas" not in hparams
    assert "'sgd' has no betas" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"lr": -1e-3}, "lr must be a number > 0"),
        ({"eps": 0.0}, "eps must be a number > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"betas": (0.9, 1.0)}, r"betas must be in \[0, 1\)"),
        ({"betas": (-0.1, 0.9)}, r"betas must be in \[0, 1\)"),
        ({"betas": (0.9, 0.9, 0.9, 0.9)}, "betas must be 2 or 3 numbers"),
        ({"betas": 0.9}, "betas must be 2 or 3 numbers"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.5}, r"momentum must be in \[0, 1\)"),
        ({"nesterovv": True}, "does not take the hyperparameter 'nesterovv'. Did you mean 'nesterov'"),
    ],
)
def test_bad_hyperparameters_are_user_errors(kwargs, message) -> None:
    name = "sgd" if "momentum" in kwargs or "nesterovv" in kwargs else "adamw"
    with pytest.raises(UserError, match=message):
        create_optimizer(torch.nn.Linear(2, 2), name, **kwargs)


def test_hyperparameter_not_taken_is_a_user_error_even_with_kwargs_signature() -> None:
    pytest.importorskip("pytorch_optimizer")  # its classes accept **kwargs and would swallow a typo
    with pytest.raises(UserError, match="'soap' does not take the hyperparameter 'precondition_freq'"):
        resolved_hparams("soap", precondition_freq=5)


# ---- parse_optimizer_args ------------------------------------------------------------------------


def test_parse_optimizer_args_types() -> None:
    parsed = parse_optimizer_args("lr=1e-4, steps=10,nesterov=true,beta1=None,betas=(0.9,0.99),mode=fast")
    assert parsed == {
        "lr": 1e-4,
        "steps": 10,
        "nesterov": True,
        "beta1": None,
        "betas": (0.9, 0.99),
        "mode": "fast",
    }
    assert isinstance(parsed["steps"], int) and isinstance(parsed["lr"], float)
    assert parse_optimizer_args("") == {} and parse_optimizer_args(None) == {}


@pytest.mark.parametrize("text, piece", [("lr", "lr"), ("lr=1e-4,=3", "=3"), ("a=1,b=", "b="),
                                         ("betas=(0.9,0.99", "unbalanced"), ("a b=1", "a b=1")])  # fmt: skip
def test_parse_optimizer_args_malformed(text, piece) -> None:
    with pytest.raises(UserError, match=f"--optimizer_args.*{piece}"):
        parse_optimizer_args(text)


def test_parse_optimizer_args_duplicate_key() -> None:
    with pytest.raises(UserError, match="'lr' is given twice"):
        parse_optimizer_args("lr=1,lr=2")


# ---- parameter groups ----------------------------------------------------------------------------


def test_param_groups_no_decay_on_biases_and_norms(tiny_unet) -> None:
    groups = param_groups(tiny_unet, weight_decay=0.1)
    decay = [g for g in groups if g["weight_decay"] == 0.1]
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert all(p.ndim > 1 for g in decay for p in g["params"])
    assert all(p.ndim <= 1 for g in no_decay for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(tiny_unet.parameters()))
    norm_weight = tiny_unet.conv_norm_out.weight
    assert any(norm_weight is p for g in no_decay for p in g["params"])


def test_create_optimizer_applies_groups_and_accepts_params(tiny_unet) -> None:
    optimizer = create_optimizer(tiny_unet, "adamw", weight_decay=0.05)
    by_decay = {g["weight_decay"]: g for g in optimizer.param_groups}
    assert set(by_decay) == {0.05, 0.0}
    assert all(p.ndim <= 1 for p in by_decay[0.0]["params"])
    plain = create_optimizer(list(tiny_unet.parameters()), "sgd", weight_decay=0.01)
    assert {g["weight_decay"] for g in plain.param_groups} == {0.01, 0.0}
    custom = create_optimizer([{"params": [tiny_unet.conv_in.weight], "lr": 0.5}], "sgd")
    assert len(custom.param_groups) == 1 and custom.param_groups[0]["lr"] == 0.5


def test_muon_routes_hidden_matrices_and_conv_kernels(tiny_unet) -> None:
    pytest.importorskip("pytorch_optimizer")
    optimizer = create_optimizer(tiny_unet, "muon")
    muon = {id(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    names = {id(p): n for n, p in tiny_unet.named_parameters()}
    routed = {names[i] for i in muon}
    assert all(tiny_unet.get_parameter(n).ndim >= 2 for n in routed)
    assert any(tiny_unet.get_parameter(n).ndim == 4 for n in routed)  # conv kernels, flattened by Muon
    assert not any(n.startswith(("conv_in.", "conv_out.")) for n in routed)
    assert (
        id(tiny_unet.conv_in.weight) not in muon
        and id(tiny_unet.down_blocks[0].resnets[0].conv1.weight) in muon
    )


# ---- state memory -------------------------------------------------------------------------------


def test_state_bytes_match_theory(tiny_unet) -> None:
    params = list(tiny_unet.parameters())
    num_params = sum(p.numel() for p in params)
    sgd = create_optimizer(tiny_unet, "sgd")
    one_step(tiny_unet, sgd)
    assert optimizer_state_bytes(sgd) == 4 * num_params  # one fp32 momentum buffer
    adamw = create_optimizer(tiny_unet, "adamw")
    one_step(tiny_unet, adamw)
    # two fp32 moments, plus one scalar step tensor per parameter tensor
    assert 8 * num_params < optimizer_state_bytes(adamw) <= 8 * num_params + 8 * len(params)
    adafactor = create_optimizer(tiny_unet, "adafactor")
    one_step(tiny_unet, adafactor)
    assert 0 < optimizer_state_bytes(adafactor) < 0.5 * optimizer_state_bytes(adamw)


def test_state_bytes_counts_shared_storage_once() -> None:
    shared = torch.zeros(100)
    optimizer = torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))], lr=0.1
    )
    params = optimizer.param_groups[0]["params"]
    optimizer.state[params[0]] = {"a": shared, "nested": {"b": [shared[:10]]}}
    optimizer.state[params[1]] = {"c": torch.zeros(5, dtype=torch.float64)}
    assert optimizer_state_bytes(optimizer) == 400 + 40


# ---- import hygiene and the CLI table ------------------------------------------------------------


def test_import_does_not_pull_optional_packages() -> None:
    code = (
        "import sys, diffusers_optim.optim as o; o.list_optimizers(); o.get_spec('lion');"
        "print([m for m in ('prodigyopt','schedulefree','lion_pytorch','bitsandbytes','pytorch_optimizer')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_table_json(capsys) -> None:
    import json

    from diffusers_optim.optim.table import main

    assert main(["--pattern", "sgd", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "sgd" and row["installed"] and row["state_bytes_per_param"] == pytest.approx(4.0)
    assert "has_momentum" in row["flags"] and row["defaults"]["momentum"] == 0.9
    assert main(["--pattern", "adamw*", "--no_measure"]) == 0
    table = capsys.readouterr().out
    assert "adamw (adamw_torch)" in table and "sgd" not in table
    with pytest.raises(UserError, match="no optimizer matches"):
        main(["--pattern", "zzz*"])


def test_table_lists_the_new_entries_with_package_defaults_and_bytes(capsys) -> None:
    import json

    from diffusers_optim.optim.table import main

    assert main(["--pattern", "*", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name, package in [("stable_adamw", "torch-optimi"), ("prodigy_plus_schedulefree", "prodigy-plus-schedule-free"),
                          ("psgd_kron", "heavyball"), ("sgd_schedulefree", "schedulefree"), ("nadam", "core"),
                          ("radam", "core"), ("radam_schedulefree", "schedulefree"), ("adamw_ao_8bit", "torchao")]:
        row = rows[name]
        assert row["package"] == package and row["defaults"]["lr"] > 0 and row["defaults_source"], name
        if row["installed"] and "needs_cuda" not in row["flags"]:
            assert row["state_bytes_per_param"] > 0, name
    assert "needs_cuda" in rows["adamw_ao_4bit"]["flags"] and rows["adamw_ao_4bit"]["state_bytes_per_param"] is None
    assert rows["sgd_schedulefree"]["state_bytes_per_param"] == pytest.approx(4.0)  # one buffer (z) per parameter
