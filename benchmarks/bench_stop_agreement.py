"""What the per-step stop agreement costs: one MAX all-reduce of two ints, next to a real Trainer step.

Every step ends with `StopRequest.agreed()` (issue 16): on one process it reads two ints; on several it is one
all-reduce on a CPU (gloo) group. This runs a real Trainer (tiny preset, digits, no tracker) and times
blocks of training steps (`train_step` + `after_step`) with and without an `agreed()` after each, in ABBA
order, then a burst of `agreed()` calls alone. Run it on the processes you train with:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_stop_agreement.py
    python benchmarks/bench_stop_agreement.py --json          # one process: no collective at all
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
    p.add_argument("--repeats", type=int, default=8, help="pairs of timed blocks (with and without the agreement)")
    p.add_argument("--block_steps", type=int, default=10, help="training steps per block")
    p.add_argument("--calls", type=int, default=2000, help="agreed() calls timed back to back")
    p.add_argument("--output_dir", default=None, help="where the Trainer writes (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = p.parse_args(argv)
    for name in ("batch_size", "repeats", "block_steps", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def build_trainer(args: argparse.Namespace, out: Path):
    from diffusers_optim.config import parse_train_args
    from diffusers_optim.trainer import Trainer

    cfg = parse_train_args(["--model_preset", args.preset, "--resolution", str(args.resolution),
                            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(2 * args.repeats * args.block_steps + 10),
                            "--logging_steps", "0", "--validation_steps", "0", "--sample_steps", "0",
                            "--checkpointing_steps", "0", "--num_validation_images", "8", "--report_to", "none",
                            "--output_dir", str(out)])
    trainer = Trainer(cfg)
    trainer.start()
    trainer.t_start = time.perf_counter()
    return trainer


def run_block(trainer, batches, steps: int, agree: bool) -> float:
    """Seconds per step over `steps` training steps, each followed by agreed() or not."""
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
        trainer.step += 1
        trainer.after_step(_NoBar())
        if agree:
            trainer.stop_request.agreed(diverged=False)
    return (time.perf_counter() - t0) / steps


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Blocks of steps with and without the agreement in ABBA order (same order on every process), then agreed()
    alone. A lone agreed() after a step also absorbs the processes' skew, which the next step's gradient
    all-reduce would absorb anyway; the with/without difference is what the agreement adds."""
    trainer = build_trainer(args, out)
    batches = iter(trainer.build_loader())
    run_block(trainer, batches, 5, agree=True)  # warm-up
    timed: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for agree in ((True, False) if i % 2 == 0 else (False, True)):
            timed[agree].append(run_block(trainer, batches, args.block_steps, agree))
    burst = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        trainer.stop_request.agreed(diverged=False)
        burst.append(time.perf_counter() - t0)
    with_s, without_s = statistics.median(timed[True]), statistics.median(timed[False])
    return {"processes": trainer.accelerator.num_processes, "preset": args.preset, "batch_per_process":
            args.batch_size, "step_ms_with": with_s * 1e3, "step_ms_without": without_s * 1e3,
            "added_us_per_step": (with_s - without_s) * 1e6, "added_fraction": with_s / without_s - 1,
            "agreed_us_alone": statistics.median(burst) * 1e6, "main": trainer.accelerator.is_main_process}


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
        print(f"{result['processes']} process(es), {args.preset} preset, batch {args.batch_size} per process "
              f"(medians of {args.repeats} blocks of {args.block_steps} steps, ABBA):")
        print(f"  step without the agreement  {result['step_ms_without']:.1f} ms")
        print(f"  step with the agreement     {result['step_ms_with']:.1f} ms "
              f"({result['added_us_per_step']:+.0f} us, {100 * result['added_fraction']:+.1f}%)")
        print(f"  agreed() alone              {result['agreed_us_alone']:.0f} us (median of {args.calls})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
