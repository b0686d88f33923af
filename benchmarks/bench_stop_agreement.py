"""What the per-step stop agreement costs: one MAX all-reduce of two ints, next to a real Trainer step.

Every step ends with `StopRequest.agreed()` (issue 16): on one process it reads two ints; on several it is one
all-reduce on a CPU (gloo) group. This runs a real Trainer (tiny preset, digits, no tracker) and times, in
turns, each training step (`train_step` + `after_step`) and the `agreed()` call that follows it, then a burst
of `agreed()` calls alone. Run it on the processes you train with:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_stop_agreement.py
    python benchmarks/bench_stop_agreement.py --steps 20 --json          # one process: no collective at all
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="UNet preset of the Trainer whose step is the yardstick")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=50, help="timed training steps (after 5 untimed)")
    p.add_argument("--calls", type=int, default=2000, help="agreed() calls timed back to back")
    p.add_argument("--output_dir", default=None, help="where the Trainer writes (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def build_trainer(args: argparse.Namespace, out: Path):
    from diffusers_optim.config import parse_train_args
    from diffusers_optim.trainer import Trainer

    cfg = parse_train_args(["--model_preset", args.preset, "--resolution", str(args.resolution),
                            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps + 10),
                            "--logging_steps", "0", "--validation_steps", "0", "--sample_steps", "0",
                            "--checkpointing_steps", "0", "--num_validation_images", "8", "--report_to", "none",
                            "--output_dir", str(out)])
    trainer = Trainer(cfg)
    trainer.start()
    trainer.t_start = time.perf_counter()
    return trainer


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Median step time and median agreed() time, taken in turns, then agreed() alone."""
    trainer = build_trainer(args, out)
    batches = iter(trainer.build_loader())
    step_s, agree_s = [], []
    for i in range(args.steps + 5):
        t0 = time.perf_counter()
        trainer.train_step(batches)
        trainer.step += 1
        trainer.after_step(_NoBar())
        t1 = time.perf_counter()
        trainer.stop_request.agreed(diverged=False)
        t2 = time.perf_counter()
        if i >= 5:
            step_s.append(t1 - t0)
            agree_s.append(t2 - t1)
    burst = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        trainer.stop_request.agreed(diverged=False)
        burst.append(time.perf_counter() - t0)
    step, agree = statistics.median(step_s), statistics.median(agree_s)
    return {"processes": trainer.accelerator.num_processes, "preset": args.preset, "batch_per_process":
            args.batch_size, "step_ms": step * 1e3, "agreed_us_after_step": agree * 1e6,
            "agreed_us_alone": statistics.median(burst) * 1e6, "fraction_of_step": agree / step,
            "main": trainer.accelerator.is_main_process}


class _NoBar:
    def set_postfix(self, **_: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(args.output_dir or tmp))
    if not result.pop("main"):
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['processes']} process(es), {args.preset} preset, batch {args.batch_size} per process:")
        print(f"  training step       {result['step_ms']:.1f} ms (median of {args.steps})")
        print(f"  agreed() after it   {result['agreed_us_after_step']:.0f} us = "
              f"{100 * result['fraction_of_step']:.2f}% of a step")
        print(f"  agreed() alone      {result['agreed_us_alone']:.0f} us (median of {args.calls})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
