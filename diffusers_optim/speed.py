"""How fast a run computes, never what: torch.compile of the training forward, TF32, channels_last, fused
optimizer steps and a foreach EMA. Each helper is called once by the Trainer and changes results by float
rounding at most (TF32 by its documented precision).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes that capture CUDA graphs on a GPU
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's FX-graph, AOTAutograd and kernel caches live under it


def configure_backends(allow_tf32: bool) -> None:
    """TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (10-bit mantissa inputs, fp32 accumulation)."""
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_channels_last(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """NHWC weights: cuDNN's tensor-core convolutions want them; inputs follow via `channels_last_input`."""
    return model.to(memory_format=torch.channels_last) if enabled else model


def channels_last_input(images: torch.Tensor, enabled: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if enabled and images.dim() == 4 else images


def compile_for_training(model: torch.nn.Module, mode: str) -> Callable[..., Any]:
    """The training forward, compiled once with static shapes.

    Only the training call goes through the compiled module: validation, probes, sampling and saving use the
    module itself, so their other batch sizes and eval mode never trigger a recompile. Every training batch has
    the same shape (the batch sampler drops partial batches), so dynamic=False costs nothing and gives the
    fastest kernels.
    """
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def mark_step_begin(mode: str, device: torch.device) -> None:
    """CUDA-graph modes reuse output buffers between replays: tell them a new training step begins."""
    if device.type == "cuda" and mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def default_compile_cache() -> Path:
    """The user's inductor cache: kept across runs, comparisons and reboots (inductor's own default is in /tmp)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusers-optim" / "inductor"


def share_compile_cache(folder: Path | None = None) -> str:
    """Point inductor's caches (FX graphs, AOTAutograd, kernels) at one folder unless the user chose one.

    Every run of a comparison trains the same shapes: the first one compiles, the others load its graphs and
    kernels (seconds instead of minutes). Set TORCHINDUCTOR_CACHE_DIR to choose the folder (e.g. shared storage).
    """
    return os.environ.setdefault(CACHE_ENV, str(folder or default_compile_cache()))


def check_compiler(device: torch.device) -> None:
    """--torch_compile on CPU needs a C++ compiler (inductor builds its kernels with it): say so before training.

    Only inductor's own "no compiler found" error means that; any other failure of the lookup is raised as it is
    (a broken inductor config once read as "needs a C++ compiler" although g++ was installed).
    """
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler:
        from diffusers_optim.errors import UserError

        raise UserError("--torch_compile on CPU needs a C++ compiler (g++ or clang++; set CXX to choose one): "
                        "install one or leave out --torch_compile") from None


def warm_up_compiled(forward_backward: Callable[[], None]) -> float:
    """Run one forward/backward that compiles both graphs; returns its wall seconds (perf/compile_s).

    Done before the first step so that the compile is neither in a step's time nor in images/s; the caller
    zeroes the gradients it leaves, and the RNG is restored so training draws exactly what an eager run draws.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        forward_backward()
    return time.perf_counter() - start


def fast_step_kwargs(flag: str | None, device: torch.device) -> dict[str, bool]:
    """{'fused': True} / {'foreach': True} for an optimizer whose spec offers it on this device, else {}.

    torch's fused Adam/AdamW/SGD/Adagrad kernels run on CPU and CUDA; foreach (one kernel per group of
    tensors instead of a Python loop over them) runs everywhere.
    """
    if flag is None or device.type not in ("cpu", "cuda"):
        return {}
    return {flag: True}
