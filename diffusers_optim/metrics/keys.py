"""Metric key names and how to read them: the one place that spells the keys the report and studies rank on.

- `val/loss`, `val_t/<lo>-<hi>`: validation loss of the weights that sample and are saved (EMA weights when
  --use_ema is on), averaged over several frozen noise/timestep draws per held-out image.
- `<key>_se`-style standard errors: `val/loss_se`, `val_t_se/<lo>-<hi>` (see `se_key`).
- With --use_ema, the raw (non-EMA) weights are measured too, under `val_raw/...`, `val_raw_t/...` and
  `eval_raw/...` (see `raw_key`); the plain keys are always the ones to rank on.
- `eval/*`: sample quality; `eval_floor/*`: the same metric for real held-out images at the same sample count
  (the best score that number of samples can show; see `floor_key`).
"""

from __future__ import annotations

from collections.abc import Iterable

VAL_LOSS = "val/loss"
# The primary sample-quality metric is the first of these a run logged: FD in the digits feature network's
# space, or FID with user-provided Inception weights. Lower is better for both.
QUALITY_KEYS = ("eval/fd", "eval/fid")
# Keys where a larger value is better; every other ranked key (losses, FD, KID) is better when smaller.
HIGHER_IS_BETTER = frozenset({
    "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/class_entropy", "eval/classes_covered",
})
_RAW_HEADS = ("val", "eval")


def se_key(key: str) -> str:
    """The standard-error key of a metric: `val/loss` -> `val/loss_se`, `val_t/000-249` -> `val_t_se/000-249`."""
    head, _, name = key.partition("/")
    if head.endswith("_t"):  # bucket keys keep their range as the name, so they still sort and match as buckets
        return f"{head}_se/{name}"
    return f"{key}_se"


def raw_key(key: str) -> str:
    """The raw-weights twin of an EMA-weights key: `val/loss` -> `val_raw/loss`, `val_t_se/...` -> `val_raw_t_se/...`."""
    head, _, name = key.partition("/")
    for base in _RAW_HEADS:
        if head == base or head.startswith(base + "_"):
            return f"{base}_raw{head[len(base):]}/{name}"
    raise ValueError(f"{key!r} has no raw-weights twin (only val*/ and eval/ keys do)")


def floor_key(key: str) -> str:
    """The floor of a sample-quality key: `eval/fd` -> `eval_floor/fd` (real held-out images, same count)."""
    head, _, name = key.partition("/")
    if head != "eval":
        raise ValueError(f"{key!r} has no floor (only eval/ keys do)")
    return f"eval_floor/{name}"


def primary_metric(keys: Iterable[str]) -> str:
    """The metric to rank on by default: the sample-quality metric when one was logged, else `val/loss`."""
    present = set(keys)
    return next((k for k in QUALITY_KEYS if k in present), VAL_LOSS)


def higher_is_better(key: str) -> bool:
    """Whether a larger value of the metric (or of its raw twin) is the better one."""
    head, _, name = key.partition("/")
    return f"{head.removesuffix('_raw')}/{name}" in HIGHER_IS_BETTER
