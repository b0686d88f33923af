"""The metric key names the report and studies rank on."""

import pytest

from diffusers_optim.metrics.keys import floor_key, higher_is_better, primary_metric, raw_key, se_key


def test_se_keys_keep_bucket_ranges_as_names():
    assert se_key("val/loss") == "val/loss_se"
    assert se_key("val_t/000-249") == "val_t_se/000-249"
    assert se_key("val_raw/loss") == "val_raw/loss_se"
    assert se_key("val_raw_t/250-499") == "val_raw_t_se/250-499"


def test_raw_keys_are_distinct_from_every_plain_key():
    assert raw_key("val/loss") == "val_raw/loss"
    assert raw_key("val_t/000-249") == "val_raw_t/000-249"
    assert raw_key("val_t_se/000-249") == "val_raw_t_se/000-249"
    assert raw_key("eval/fd") == "eval_raw/fd"
    with pytest.raises(ValueError):
        raw_key("train/loss")


def test_floor_and_primary_metric_and_direction():
    assert floor_key("eval/fd") == "eval_floor/fd"
    with pytest.raises(ValueError):
        floor_key("val/loss")
    assert primary_metric(["val/loss", "eval/kid", "eval/fd"]) == "eval/fd"
    assert primary_metric(["val/loss", "eval/fid"]) == "eval/fid"
    assert primary_metric(["val/loss", "train/loss"]) == "val/loss"
    assert higher_is_better("eval/recall") and higher_is_better("eval_raw/precision")
    assert not higher_is_better("eval/fd") and not higher_is_better("val/loss")
