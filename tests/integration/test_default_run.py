"""A first run with default flags: `diffusers-optim train --max_train_steps 20` must not fail on a default."""

from __future__ import annotations

import json

from diffusers_optim.cli import main


def test_twenty_steps_with_default_schedule_flags_succeed(tmp_path, offline_env, capsys):
    out = tmp_path / "run"
    # The defaults under test (warmup, schedule, batch, resolution, optimizer) are left alone; only the cost of
    # sampling is shrunk (the full-default command was timed by hand: ~30 s of CPU).
    cheap = ["--num_inference_steps", "2", "--num_samples", "4", "--num_eval_samples", "16"]
    assert main(["train", "--max_train_steps", "20", "--output_dir", str(out), *cheap]) == 0
    assert "done: 20 steps" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["lr_scheduler"], config["lr_warmup_steps"]) == ("cosine", 2)  # resolved and recorded
