"""UNet2DModel presets and the DDPMScheduler, built from the run config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_optim.errors import UserError, unknown_choice

# Each preset is a UNet2DModel config without sample_size/in/out channels (those follow the data).
PRESETS: dict[str, dict[str, Any]] = {
    # ~177k parameters (1 channel): tests and the CPU demo (digits at --resolution 8).
    "tiny": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # ~1.1M parameters: a quick GPU run, or a slow but real CPU one.
    "small": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=16,
    ),
    # Ho et al. 2020 CIFAR-10 DDPM layout (as google/ddpm-cifar10-32, ~36M parameters).
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
    ),
    # diffusers' train_unconditional.py default (the 256px DDPM layout, ~114M parameters at 6 levels).
    "ddpm-256": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}


def load_unet_config(preset: str, config_path: str | None) -> dict[str, Any]:
    """The UNet config from a preset name or a user's config file/folder."""
    if config_path:
        path = Path(config_path).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if path.is_file():
            return UNet2DModel.load_config(str(path.parent) if path.name == "config.json" else str(path))
        if looks_like_hub_id(config_path):
            return load_hub_unet_config(config_path)
        raise UserError(f"model config not found: {config_path}")
    if preset not in PRESETS:
        raise unknown_choice("model preset", preset, PRESETS)
    return dict(PRESETS[preset])


def looks_like_hub_id(text: str) -> bool:
    """'owner/name' or 'name' with no path syntax (diffusers' examples pass e.g. diffusers/ddpm_dummy)."""
    parts = text.split("/")
    return len(parts) <= 2 and all(parts) and not text.startswith((".", "~")) and not text.endswith(".json")


def load_hub_unet_config(repo_id: str) -> dict[str, Any]:
    """A UNet config from the Hub (or the local Hub cache); offline or unknown ids are explained in one line."""
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return dict(UNet2DModel.load_config(repo_id))
    except (OSError, ValueError, HfHubHTTPError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hub cache" if offline
               else f"it could not be loaded from the Hub ({str(err).splitlines()[0]})")
        raise UserError(
            f"--model_config_name_or_path {repo_id}: not a local folder or file, and as a Hub model id {why}. "
            f"Fetch it once online (huggingface-cli download {repo_id} config.json) or pass a local config.json"
        ) from None


def downsample_factor(config: dict[str, Any]) -> int:
    """How many times the UNet halves the resolution (the resolution must be divisible by 2**this)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_resolution(config: dict[str, Any], resolution: int) -> None:
    """Fail early, in words, for a resolution the UNet cannot take."""
    factor = downsample_factor(config)
    if resolution <= 0 or resolution % factor:
        raise UserError(
            f"--resolution {resolution} does not fit this UNet: it downsamples {factor}x, "
            f"so the resolution must be a positive multiple of {factor}"
        )


def build_unet(
    preset: str = "tiny",
    resolution: int = 16,
    channels: int = 1,
    init_seed: int = 0,
    config_path: str | None = None,
) -> UNet2DModel:
    """A freshly initialised UNet2DModel; the same init_seed gives the same weights everywhere."""
    config = load_unet_config(preset, config_path)
    check_resolution(config, resolution)
    config.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return UNet2DModel(**config)


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                          prediction_type: str = "epsilon") -> DDPMScheduler:
    """The DDPMScheduler used for training noise and for sampling."""
    try:
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
        )
    except NotImplementedError:
        raise UserError(f"unknown --ddpm_beta_schedule '{beta_schedule}'") from None


def save_unet_config(model: UNet2DModel, path: Path) -> None:
    path.write_text(json.dumps(dict(model.config), indent=2, default=str))
