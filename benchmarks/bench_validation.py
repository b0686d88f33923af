"""Validation cost: the new validation (whole held-out split, several draws) against the old one, side by side.

Two real Trainers train the same model in one process, taking turns step by step (ABBA order, so a change in
the machine's load hits both alike):
- **old**: the validation as it was before issue 10: 64 held-out images, one frozen draw;
- **new**: the default validation: the whole held-out split (400 digits), `--num_validation_draws` draws each.

Both validate every --validation_steps steps. Reported, as medians over repeats (one validation interval each):
the throughput of the optimizer steps between validation steps (new/old, the acceptance check: within 2%),
the seconds one validation takes, and the share of a validation interval it costs.

    python benchmarks/bench_validation.py                       # tiny, 16 px, batch 64, validation every 50 steps
    python benchmarks/bench_validation.py --draws 4 --json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench_validation")
TARGET_RATIO = 0.98  # issue 10: steps between validations keep at least this share of the old throughput
OLD = {"num_validation_images": 64, "num_validation_draws": 1}


def overhead_helpers():
    """The step-timing helpers of bench_trainer_overhead.py (one way of timing for every benchmark)."""
    spec = importlib.util.spec_from_file_location("bench_trainer_overhead", Path(__file__).with_name(
        "bench_trainer_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--validation_steps", type=int, default=50)
    p.add_argument("--draws", type=int, default=None, help="--num_validation_draws of the new validation "
                   "(default: the training script's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed validation intervals; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--output_dir", default=None, help="where the Trainers write (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name in ("batch_size", "validation_steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


class ValidatingTrainer:
    """The real Trainer, one `Trainer.run_step` per call, validating every validation_steps steps."""

    def __init__(self, args: argparse.Namespace, output_dir: Path, **validation: int):
        from tqdm.auto import tqdm

        from diffusers_optim.config import TrainConfig
        from diffusers_optim.trainer import Trainer

        cfg = TrainConfig(model_preset=args.preset, resolution=args.resolution, train_batch_size=args.batch_size,
                          report_to="none", output_dir=str(output_dir), max_train_steps=10**9,
                          validation_steps=args.validation_steps, logging_steps=10, sample_steps=0,
                          eval_steps=0, checkpointing_steps=0, **validation)
        self.trainer = Trainer(cfg)
        self.trainer.start()
        self.batches = iter(self.trainer.build_loader())
        self.bar = tqdm(disable=True)
        self.trainer.t_start = time.perf_counter()
        self.num_validation = len(self.trainer.data.validation) * cfg.num_validation_draws

    def step(self) -> bool:
        """One optimizer step plus its after-step work; returns whether it validated."""
        self.trainer.run_step(self.batches, self.bar)
        return self.trainer.step % self.trainer.cfg.validation_steps == 0


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Warm up, then time both Trainers interleaved, one validation interval per repeat."""
    helpers = overhead_helpers()
    new_validation = {} if args.draws is None else {"num_validation_draws": args.draws}
    old, new = ValidatingTrainer(args, root / "old", **OLD), ValidatingTrainer(args, root / "new", **new_validation)
    device, interval = old.trainer.accelerator.device, args.validation_steps
    loops = [("old", old.step), ("new", new.step)]
    helpers.timed_interval(loops, interval, 1, device)  # warm-up: one whole interval, validation included
    rows = []
    for r in range(args.repeats):
        times = helpers.timed_interval(loops if r % 2 == 0 else loops[::-1], interval, 1, device)
        row = {}
        for name, steps in times.items():
            between = [t[0] for t in steps if not t[2]]
            step_s = statistics.median(between)
            validation_s = sum(t[0] for t in steps if t[2]) - step_s  # a validating step also trains once
            row[name] = {"between_images_per_sec": args.batch_size * len(between) / sum(between),
                         "validation_s": validation_s, "validation_share": validation_s / sum(t[0] for t in steps)}
        row["ratio"] = row["new"]["between_images_per_sec"] / row["old"]["between_images_per_sec"]
        rows.append(row)
        logger.info(f"interval {r + 1}/{args.repeats}: new/old between validations {row['ratio']:.3f}, validation "
                    f"{row['old']['validation_s']:.2f} s old, {row['new']['validation_s']:.2f} s new")
    return summarize(rows, old, new)


def summarize(rows: list[dict[str, Any]], old: ValidatingTrainer, new: ValidatingTrainer) -> dict[str, Any]:
    def median(name: str, key: str) -> float:
        return statistics.median(row[name][key] for row in rows)

    return {
        "ratio_between_validations": statistics.median(row["ratio"] for row in rows),
        **{f"{name}_{key}": median(name, key) for name in ("old", "new")
           for key in ("between_images_per_sec", "validation_s", "validation_share")},
        "old_validation_forwards": old.num_validation,
        "new_validation_forwards": new.num_validation,
        "new_num_validation_draws": new.trainer.cfg.num_validation_draws,
        "repeats": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    s, r = report["settings"], report["result"]
    lines = [
        f"validation, old (64 images x 1 draw) vs new ({r['new_validation_forwards']} forwards: "
        f"{r['new_num_validation_draws']} draws): {s['preset']}, {s['resolution']}px, batch {s['batch_size']}, "
        f"validation every {s['validation_steps']} steps",
        f"torch {s['torch']}, torch.set_num_threads({s['threads']}); median of {s['repeats']} validation intervals, "
        "the Trainers taking turns step by step",
        "",
        f"{'':<5} {'img/s between validations':>26} {'s per validation':>17} {'share of interval':>18}",
    ]
    for name in ("old", "new"):
        lines.append(f"{name:<5} {r[f'{name}_between_images_per_sec']:>26.0f} {r[f'{name}_validation_s']:>17.2f} "
                     f"{r[f'{name}_validation_share']:>18.1%}")
    verdict = "meets" if r["ratio_between_validations"] >= TARGET_RATIO else "MISSES"
    lines += ["", f"new/old throughput between validations: {r['ratio_between_validations']:.3f} "
              f"({verdict} the target >= {TARGET_RATIO})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    threads = args.threads or overhead_helpers().usable_cores()
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        root = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        result = measure(args, root)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("json", "output_dir")}, "threads": threads,
                "torch": torch.__version__, "target_ratio": TARGET_RATIO}
    report = {"settings": settings, "result": result}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    from diffusers_optim.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
