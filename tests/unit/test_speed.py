"""The speed paths compute what the reference computes: the Trainer's foreach EMA against the EMA formula,
fused/foreach optimizer steps against torch's per-tensor loop, and the one-line error for a missing compiler."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffusers_optim.models import build_unet
from diffusers_optim.optim.builtin import BUILTIN_SPECS
from diffusers_optim.optim.factory import build, resolve
from diffusers_optim.speed import channels_last_input, check_compiler, fast_step_kwargs, to_channels_last
from diffusers_optim.trainer import build_ema


def _grads(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def _small_net() -> torch.nn.Module:
    """Conv, norm and linear tensors of several shapes (the optimizers' equality does not need a UNet)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 14 * 14, 10))


def test_trainer_ema_is_foreach_and_matches_the_ema_formula(tiny_config):
    """build_ema's EMA (diffusers EMAModel with foreach) against ema = d*ema + (1-d)*param, step by step."""
    cfg = tiny_config("--use_ema")
    model = build_unet("tiny", 16, 1, 0)
    ema = build_ema(cfg, model)
    assert ema.foreach
    reference = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + i)) * 0.1)
        ema.step(model.parameters())
        # diffusers' warmup decay: 1 - (1 + step/inv_gamma)^-power, capped at max_decay
        decay = min(1 - (1 + (step - 1) / cfg.ema_inv_gamma) ** -cfg.ema_power, cfg.ema_max_decay)
        reference = [decay * r + (1 - decay) * p.detach() for r, p in zip(reference, model.parameters())]
        for shadow, expected in zip(ema.shadow_params, reference):
            torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7)


FAST_SPECS = [spec.name for spec in BUILTIN_SPECS if spec.fast_step]


def test_torch_optimizers_declare_their_fast_step():
    assert set(FAST_SPECS) >= {"adam", "adamw", "sgd", "rmsprop", "adagrad"}


@pytest.mark.parametrize("name", FAST_SPECS)
def test_fast_optimizer_steps_match_the_per_tensor_loop(name):
    """The registry's build on a device turns on the spec's fused/foreach step; ten steps equal torch's loop."""
    spec = next(s for s in BUILTIN_SPECS if s.name == name)
    hparams = {"lr": 1e-3, "weight_decay": 1e-2} if spec.has_weight_decay else {"lr": 1e-3}
    models = [_small_net() for _ in range(2)]
    reference = build(resolve(spec, {**hparams, "foreach": False}), models[0], torch.device("cpu"))
    fast = build(resolve(spec, hparams), models[1], torch.device("cpu"))
    assert fast.defaults[spec.fast_step] is True and not reference.defaults.get("fused")
    for step in range(10):
        for model, opt in zip(models, (reference, fast)):
            _grads(model, step)
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_false_in_optimizer_args_wins():
    opt = build(resolve("adamw", {"fused": False}), _small_net(), torch.device("cpu"))
    assert not opt.defaults["fused"]
    assert not build(resolve("adamw", {}), _small_net()).defaults["fused"]  # no device given: torch's default


def test_fast_step_kwargs_only_where_torch_has_kernels():
    assert fast_step_kwargs("fused", torch.device("cpu")) == {"fused": True}
    assert fast_step_kwargs("foreach", torch.device("cuda")) == {"foreach": True}
    assert fast_step_kwargs(None, torch.device("cpu")) == {}
    assert fast_step_kwargs("fused", torch.device("meta")) == {}


def test_channels_last_changes_layout_not_values():
    model = build_unet("tiny", 16, 1, 0)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = model(x, t).sample
        nhwc = to_channels_last(model, True)
        got = nhwc(channels_last_input(x, True), t).sample
    assert next(p for p in nhwc.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_missing_compiler_is_a_one_line_error():
    from torch._inductor import config

    from diffusers_optim.errors import UserError

    # inductor's own patch(): pytest's monkeypatch cannot undo a setattr on its config proxy (the attribute was
    # gone afterwards, and every later --torch_compile in the process read as "no compiler")
    with config.patch({"cpp.cxx": (None, "no-such-compiler-x")}):
        with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
            check_compiler(torch.device("cpu"))
    if shutil.which(config.cpp.cxx[1] or "g++"):
        check_compiler(torch.device("cpu"))  # the compiler is found again once the patch is undone
    check_compiler(torch.device("cuda"))  # GPU kernels are Triton's: no host compiler needed


def test_another_failure_of_the_compiler_lookup_is_not_called_a_missing_compiler(monkeypatch):
    """A broken inductor (here: its config without cpp.cxx, which pytest's monkeypatch once left behind) raises its own
    error instead of the misleading "needs a C++ compiler"."""
    from torch._inductor import cpp_builder

    def broken() -> str:
        raise AttributeError("torch._inductor.config.cpp.cxx does not exist")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", broken)
    with pytest.raises(AttributeError, match="cpp.cxx does not exist"):
        check_compiler(torch.device("cpu"))


def test_the_trainer_points_inductor_at_the_shared_cache(tiny_config, tmp_path, monkeypatch):
    """The folder is set before inductor first looks it up (it pins its /tmp default on that first look)."""
    import os

    from diffusers_optim.trainer import Trainer

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Trainer(tiny_config("--torch_compile"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "diffusers-optim" / "inductor")

