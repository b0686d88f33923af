"""diffusers' own example test command lines run unchanged against our script (a drop-in for train_unconditional.py).

The command lines are those of diffusers' examples/unconditional_image_generation/test_unconditional.py. Two
things differ, because this machine is offline: `--dataset_name hf-internal-testing/dummy_image_class_data` becomes
`--train_data_dir` with a local folder, and the Hub id `diffusers/ddpm_dummy` is served from a local Hub cache that
holds a small stand-in UNet2DModel config (the real file cannot be fetched here), so the Hub-id code path is the
real one. Our checkpoints live in output_dir/checkpoints/checkpoint-000006 instead of output_dir/checkpoint-6; the
tests compare the steps that were saved.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_optim.checkpoint import list_checkpoints
from diffusers_optim.trainer import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "train_scripts/train_unconditional.py"
DIFFUSERS_SCRIPT = "examples/unconditional_image_generation/train_unconditional.py"
HUB_DATA = "--dataset_name hf-internal-testing/dummy_image_class_data"
# A small UNet2DModel config standing in for the Hub's diffusers/ddpm_dummy (two levels, one attention block).
STAND_IN_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8,
}  # fmt: skip
NUM_TRAIN_IMAGES = 6  # one epoch at batch 1 = 6 steps, as diffusers' tests expect (checkpoint-2, -4, -6)
NUM_VALIDATION = 64  # our default --num_validation_images is held out of the folder

# diffusers' test_unconditional.py, verbatim ({tmpdir} is their temporary folder).
TRAIN = f"""
    {DIFFUSERS_SCRIPT} {HUB_DATA} --model_config_name_or_path diffusers/ddpm_dummy --resolution 64
    --output_dir {{tmpdir}} --train_batch_size 2 --num_epochs 1 --gradient_accumulation_steps 1
    --ddpm_num_inference_steps 2 --learning_rate 1e-3 --lr_warmup_steps 5"""
TOTAL_LIMIT = f"""
    {DIFFUSERS_SCRIPT} {HUB_DATA} --model_config_name_or_path diffusers/ddpm_dummy --resolution 64
    --output_dir {{tmpdir}} --train_batch_size 1 --num_epochs 1 --gradient_accumulation_steps 1
    --ddpm_num_inference_steps 2 --learning_rate 1e-3 --lr_warmup_steps 5 --checkpointing_steps=2
    --checkpoints_total_limit=2"""
MULTIPLE = f"""
    {DIFFUSERS_SCRIPT} {HUB_DATA} --model_config_name_or_path diffusers/ddpm_dummy --resolution 64
    --output_dir {{tmpdir}} --train_batch_size 1 --num_epochs 1 --gradient_accumulation_steps 1
    --ddpm_num_inference_steps 1 --learning_rate 1e-3 --lr_warmup_steps 5 --checkpointing_steps=2"""
RESUME = f"""
    {DIFFUSERS_SCRIPT} {HUB_DATA} --model_config_name_or_path diffusers/ddpm_dummy --resolution 64
    --output_dir {{tmpdir}} --train_batch_size 1 --num_epochs 2 --gradient_accumulation_steps 1
    --ddpm_num_inference_steps 1 --learning_rate 1e-3 --lr_warmup_steps 5 --resume_from_checkpoint=checkpoint-6
    --checkpointing_steps=2 --checkpoints_total_limit=2"""


@pytest.fixture
def local(tmp_path, offline_env, monkeypatch) -> dict[str, Path]:
    """An image folder and an offline Hub cache holding the model config, as the Hub would have served them."""
    import huggingface_hub.constants

    # child processes read HF_HOME from offline_env; this process computed its cache path at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(Path(offline_env["HF_HOME"]) / "hub"))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_TRAIN_IMAGES + NUM_VALIDATION):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    repo = Path(offline_env["HF_HOME"]) / "hub" / "models--diffusers--ddpm_dummy"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(STAND_IN_CONFIG))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return {"images": images, "tmpdir": tmp_path / "out"}


def our_args(command: str, local: dict[str, Path]) -> list[str]:
    """The diffusers command line for our script: only the Hub data set is swapped for the local folder."""
    command = command.replace(HUB_DATA, f"--train_data_dir {local['images']}")
    args = command.format(tmpdir=local["tmpdir"]).split()
    assert args[0] == DIFFUSERS_SCRIPT
    return args[1:]


def saved_steps(out: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in list_checkpoints(out)}


@pytest.mark.slow
def test_train_unconditional_under_accelerate_launch(local, offline_env):
    cmd = ["accelerate", "launch", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           SCRIPT, *our_args(TRAIN, local)]  # fmt: skip
    proc = subprocess.run(cmd, env=offline_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = local["tmpdir"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["max_train_steps"] == NUM_TRAIN_IMAGES // 2  # one epoch at batch 2
    assert config["config"]["num_inference_steps"] == 2  # --ddpm_num_inference_steps
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]
    assert "never reaches its peak" in proc.stderr  # warmup 5 in a 3-step run: diffusers accepts it, we warn


def test_checkpoints_total_limit(local):
    assert main(our_args(TOTAL_LIMIT, local)) == 0
    assert saved_steps(local["tmpdir"]) == {4, 6}  # diffusers: {checkpoint-4, checkpoint-6}


@pytest.mark.slow
def test_total_limit_removes_multiple_checkpoints_and_resume_from_checkpoint_6(local):
    assert main(our_args(MULTIPLE, local)) == 0
    assert saved_steps(local["tmpdir"]) == {2, 4, 6}  # diffusers: {checkpoint-2, checkpoint-4, checkpoint-6}
    # the folder holds a finished run: without finding checkpoint-6 this would be an error, not a fresh start
    assert main(our_args(RESUME, local)) == 0
    records = [json.loads(line) for line in (local["tmpdir"] / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12  # two epochs of six steps, the second continued from step 6
    # diffusers' test expects {checkpoint-8, checkpoint-10} for its Hub data set; two epochs of our six images end
    # at step 12, so the two newest are 10 and 12 (the same rule: keep --checkpoints_total_limit newest).
    assert saved_steps(local["tmpdir"]) == {10, 12}


def test_every_diffusers_flag_is_accepted():
    """Each of the 45 flags of diffusers' train_unconditional.py parses, with a value of its type."""
    from diffusers_optim.config import parse_train_args

    values = {"--logger": "tensorboard", "--mixed_precision": "no", "--prediction_type": "epsilon",
              "--lr_scheduler": "cosine", "--ddpm_beta_schedule": "linear", "--resume_from_checkpoint": "latest",
              "--adam_beta1": "0.9", "--adam_beta2": "0.999", "--ema_max_decay": "0.9999", "--ddpm_num_steps": "1000"}  # betas must be below 1
    for flag in DIFFUSERS_FLAGS:
        parse_train_args([flag] if flag in DIFFUSERS_BOOLEAN else [flag, values.get(flag, "1")])


# diffusers' examples/unconditional_image_generation/train_unconditional.py, every add_argument
DIFFUSERS_BOOLEAN = {"--overwrite_output_dir", "--center_crop", "--random_flip", "--use_ema", "--push_to_hub",
                     "--hub_private_repo", "--enable_xformers_memory_efficient_attention", "--preserve_input_precision"}
DIFFUSERS_FLAGS = sorted(DIFFUSERS_BOOLEAN | {
    "--dataset_name", "--dataset_config_name", "--model_config_name_or_path", "--train_data_dir", "--output_dir",
    "--cache_dir", "--resolution", "--train_batch_size", "--eval_batch_size", "--dataloader_num_workers",
    "--num_epochs", "--save_images_epochs", "--save_model_epochs", "--gradient_accumulation_steps",
    "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
    "--adam_epsilon", "--ema_inv_gamma", "--ema_power", "--ema_max_decay", "--hub_token", "--hub_model_id",
    "--logger", "--logging_dir", "--local_rank", "--mixed_precision", "--prediction_type", "--ddpm_num_steps",
    "--ddpm_num_inference_steps", "--ddpm_beta_schedule", "--checkpointing_steps", "--checkpoints_total_limit",
    "--resume_from_checkpoint",
})  # fmt: skip
