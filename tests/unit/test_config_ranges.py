"""Every numeric flag is range-checked at parse time: one `--flag must be ...` line, before anything is built."""

from __future__ import annotations

import pytest

from diffusers_optim.config import RANGES, parse_train_args
from diffusers_optim.errors import UserError

# (flags, text the error must contain)
BAD_NUMBERS = [
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be > 0"),
    (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    (["--max_train_steps=-5"], "--max_train_steps must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--num_eval_samples", "0"], "--num_eval_samples must be at least 1"),
    (["--dataloader_num_workers=-1"], "--dataloader_num_workers must be at least 0"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1 or left unset"),
    (["--logging_steps=-1"], "--logging_steps must be at least 0"),
    (["--checkpointing_steps=-1"], "--checkpointing_steps must be at least 0"),
    (["--validation_steps=-1"], "--validation_steps must be at least 0"),
    (["--sample_steps=-1"], "--sample_steps must be at least 0"),
    (["--max_grad_norm=-1"], "--max_grad_norm must be at least 0"),
    (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number"),
    (["--snr_gamma=-5"], "--snr_gamma must be > 0 or left unset"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0 or left unset"),
    (["--adam_beta2", "1"], "--adam_beta2 must be below 1"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be > 0"),
    (["--ema_max_decay", "1.5"], "--ema_max_decay must be below 1"),
    (["--num_epochs", "0"], "--num_epochs must be at least 1 or left unset"),
    (["--stop_after_steps", "0"], "--stop_after_steps must be at least 1 or left unset"),
    (["--max_train_samples", "0"], "--max_train_samples must be at least 1 or left unset"),
    (["--seed=-1"], "--seed must be at least 0"),
    (["--ddpm_num_steps", "0"], "--ddpm_num_steps must be at least 1"),
    (["--num_timestep_buckets", "0"], "--num_timestep_buckets must be at least 1"),
    (["--num_timestep_buckets", "20", "--ddpm_num_steps", "10"], "cannot exceed --ddpm_num_steps"),
    (["--lr_warmup_steps=-1"], "--lr_warmup_steps must be at least 0"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be at least 1"),
]


@pytest.mark.parametrize("flags, expected", BAD_NUMBERS, ids=[" ".join(f) for f, _ in BAD_NUMBERS])
def test_bad_number_is_refused_at_parse_time(flags, expected):
    with pytest.raises(UserError) as err:
        parse_train_args(flags)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_bad_number_in_a_config_file_is_refused_too(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train_batch_size: 0\n")
    with pytest.raises(UserError, match="--train_batch_size must be at least 1"):
        parse_train_args(["--config", str(path)])


def test_limits_accept_their_edges_and_unset():
    cfg = parse_train_args(["--logging_steps", "0", "--max_grad_norm", "0", "--dataloader_num_workers", "0",
                            "--checkpoints_total_limit", "1", "--ema_max_decay", "1", "--snr_gamma", "5"])
    assert cfg.checkpoints_total_limit == 1 and cfg.snr_gamma == 5.0
    assert parse_train_args([]).checkpoints_total_limit is None


def test_every_ranged_name_is_a_flag():
    from diffusers_optim.config import field_types

    assert set(RANGES) <= set(field_types())
