"""Every registered optimizer trains through the real Trainer: validation, a sample grid, a checkpoint, a resume.

The hand-made loop of tests/unit/test_optim_all.py holds for the registry; this holds for the trainer, where
train/eval modes, checkpoint hooks and Accelerate's optimizer wrapper come in. An entry whose package is not
installed, or that needs a GPU on this CPU machine, is skipped with the reason (never passed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_optim.config import parse_train_args
from diffusers_optim.models import build_unet
from diffusers_optim.optim import get_spec, list_optimizers
from diffusers_optim.trainer import Trainer

# The smallest run that still validates, samples and checkpoints at step 3 and resumes to step 6.
FLAGS = ["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "4", "--num_validation_images", "4",
         "--num_inference_steps", "2", "--num_samples", "4", "--max_train_steps", "6", "--lr_warmup_steps", "0",
         "--logging_steps", "3", "--validation_steps", "3", "--sample_steps", "3", "--checkpointing_steps", "3"]  # fmt: skip


def skip_reason(name: str) -> str | None:
    """Why this entry cannot run here, or None."""
    spec = get_spec(name)
    if not spec.is_available():
        return spec.missing_package_message()
    if spec.needs_cuda and not torch.cuda.is_available():
        return f"optimizer '{name}' needs a CUDA GPU; this machine has none"
    return None


def train(name: str, out: Path, *extra: str) -> dict:
    cfg = parse_train_args([*FLAGS, "--optimizer", name, "--output_dir", str(out), *extra])
    return Trainer(cfg).train()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measured(record: dict) -> dict:
    """A record without its timings (wall time and throughput differ between any two runs)."""
    return {k: v for k, v in record.items() if not k.startswith(("perf/", "elapsed"))}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("name", list_optimizers())
def test_optimizer_trains_through_the_trainer_and_resumes_exactly(name: str, tmp_path: Path) -> None:
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(name, straight)["status"] == "complete"
    assert train(name, split, "--stop_after_steps", "3") == {"status": "stopped", "steps": 3}
    assert (split / "checkpoints" / "checkpoint-000003" / "trainer_state.json").is_file()
    summary = train(name, split, "--resume_from_checkpoint", "latest")
    assert summary["status"] == "complete" and summary["steps"] == 6

    logged = records(straight)
    assert [r["step"] for r in logged] == [3, 6]
    for record in logged:
        assert math.isfinite(record["train/loss"]) and math.isfinite(record["val/loss"]), record
    assert sorted(p.name for p in (straight / "samples").glob("*.png")) == ["step_000003.png", "step_000006.png"]
    # the default schedule: cosine decays to 0 at the end, schedule-free optimizers keep a constant lr
    spec = get_spec(name)
    peak = json.loads((straight / "config.json").read_text())["optimizer"]["hparams"]["lr"]
    assert logged[-1]["train/lr"] == (peak if spec.schedule_free else 0.0)
    a, b = weights(straight), weights(split)
    init = build_unet("tiny", 8, 1, init_seed=0).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a), f"{name}: six steps left the weights unchanged"

    resumed = records(split)
    assert [r["step"] for r in resumed] == [3, 6] and all(math.isfinite(r["val/loss"]) for r in resumed)
    assert measured(resumed[0]) == measured(logged[0])  # up to the checkpoint, the same run
    if not spec.exact_resume:  # declared on the spec: part of its state lives outside state_dict
        return
    assert [measured(r) for r in resumed] == [measured(r) for r in logged], "the resumed run logged other numbers"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key} differs after resume")
