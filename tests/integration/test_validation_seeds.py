"""Through the real Trainer: validation standard errors, seeds that change the initial weights, EMA and raw keys."""

import json
import math

import pytest
import torch

from diffusers_optim.trainer import Trainer


def initial_weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_val_loss_standard_error_shrinks_as_draws_grow(tiny_config, tmp_path):
    records = {}
    for draws in (1, 4):
        cfg = tiny_config("--num_validation_images", "64", "--num_validation_draws", str(draws),
                          "--output_dir", str(tmp_path / f"d{draws}"))
        records[draws] = Trainer(cfg).validate()  # the same initial weights, measured with 1 and 4 draws
    one, four = records[1], records[4]
    # 4x the samples: the standard error should halve (measured ~0.5); 0.75 leaves room for the variance estimate
    assert four["val/loss_se"] < 0.75 * one["val/loss_se"]
    buckets = [k for k in one if k.startswith("val_t_se/")]
    assert len(buckets) == 4 and all(four[k] < one[k] for k in buckets)
    # and both estimate the same loss, within their errors
    assert abs(four["val/loss"] - one["val/loss"]) < 3 * math.hypot(one["val/loss_se"], four["val/loss_se"])


def test_seeds_change_the_initial_weights_unless_fixed_init(tiny_config, tmp_path):
    def build(*flags: str) -> Trainer:
        return Trainer(tiny_config(*flags, "--output_dir", str(tmp_path / "_".join(flags))))

    seed0, seed1 = build("--seed", "0"), build("--seed", "1")
    seed0_sgd = build("--seed", "0", "--optimizer", "sgd")
    fixed1, fixed2 = build("--seed", "1", "--fixed_init"), build("--seed", "2", "--fixed_init")
    assert not torch.equal(initial_weights(seed0), initial_weights(seed1))
    assert torch.equal(initial_weights(seed0), initial_weights(seed0_sgd))  # same seed: same start, any optimizer
    assert torch.equal(initial_weights(fixed1), initial_weights(fixed2))
    assert torch.equal(initial_weights(fixed1), initial_weights(seed0))  # --fixed_init: init seed 0
    assert (seed1.cfg.init_seed, fixed2.cfg.init_seed) == (1, 0)  # resolved, so config.json records it
    assert seed0.sample_seed != seed1.sample_seed  # and each seed samples from its own noise

    # the seeds of one arm stay one arm, with or without --fixed_init (their configs as the Trainer records them)
    from diffusers_optim.arms import arm_identity

    def identity(trainer: Trainer) -> str:
        return arm_identity(trainer.run_config()["config"])

    assert identity(seed0) == identity(seed1) != identity(seed0_sgd)
    assert identity(fixed1) == identity(fixed2) != identity(seed1)


@pytest.mark.slow
def test_ema_runs_log_ema_and_raw_weights_under_distinct_keys(tiny_config, tmp_path):
    cfg = tiny_config("--use_ema", "--ema_max_decay", "0.9", "--max_train_steps", "4", "--logging_steps", "2",
                      "--output_dir", str(tmp_path / "ema"))
    Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    for key in ("val/loss", "val/loss_se", "val_t/000-249", "val_t_se/000-249", "eval/fd", "eval/precision"):
        raw = key.replace("val", "val_raw", 1) if key.startswith("val") else key.replace("eval/", "eval_raw/")
        assert math.isfinite(final[key]) and math.isfinite(final[raw]), key
    assert final["val/loss"] != final["val_raw/loss"]  # two different sets of weights
    assert {"eval_floor/fd", "eval_floor/precision", "eval_floor/num_samples"} <= set(final)
    assert final["train/images_seen"] == 4 * 8 and final["elapsed_s"] > 0
    assert final["optim/state_bytes_per_param"] == pytest.approx(8.0, rel=0.01)  # AdamW: two fp32 moments
    assert "perf/process_peak_rss_mb" in final and "perf/device_peak_memory_mb" not in final
    assert final["train/effective_lr"] == final["train/lr"]  # AdamW applies its lr as is
