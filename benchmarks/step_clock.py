"""Run a training script unchanged and record when each optimizer step ends (wall and process CPU clocks).

The same clock serves our trainer and any other script (diffusers' example), so both are timed alike: a global
optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook) appends one JSON line per step,
and the process ends right after --stop_after steps, before any end-of-run sampling or saving.

    python benchmarks/step_clock.py --out steps.jsonl --stop_after 40 -- SCRIPT [SCRIPT FLAGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        sys.exit("error: put the script and its flags after --")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON lines: step, wall_s and cpu_s since the process started")
    p.add_argument("--stop_after", type=int, required=True, help="end the process after this many steps")
    args = p.parse_args(argv[:split])
    if not argv[split + 1:]:
        sys.exit("error: no script after --")
    return args, argv[split + 1:]


def install_clock(out_path: str, stop_after: int) -> None:
    """Every optimizer step appends (step, wall, cpu); after stop_after steps the process exits at once."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out = open(out_path, "w", buffering=1)  # noqa: SIM115 - open for the life of the process
    wall0, count = time.perf_counter(), [0]

    def hook(optimizer, args, kwargs) -> None:
        count[0] += 1
        out.write(json.dumps({"step": count[0], "wall_s": time.perf_counter() - wall0,
                              "cpu_s": time.process_time()}) + "\n")
        if count[0] >= stop_after:
            out.close()
            os._exit(0)  # the measured window is over: skip the script's final sampling and saving

    register_optimizer_step_post_hook(hook)


def main(argv: list[str] | None = None) -> None:
    args, script = parse_args(list(sys.argv[1:] if argv is None else argv))
    install_clock(args.out, args.stop_after)
    sys.argv = script
    sys.path.insert(0, os.path.dirname(os.path.abspath(script[0])))
    runpy.run_path(script[0], run_name="__main__")


if __name__ == "__main__":
    main()
