"""Run by test_distributed.py under `accelerate launch --num_processes 2`: start-up, raced by two real processes.

    two_process_startup.py ROOT N TRAIN_FLAGS...

1. The start-up checks alone, N times on fresh folders, plus a folder that holds a run and one that cannot be
   created: both processes enter each check together (a barrier first), and each writes what it got.
   Then the stop agreement: nothing, SIGTERM to the second process only, a divergence on the main one only.
2. N real Trainer starts back to back in the same two processes (one import instead of N, so 20 starts fit in
   the test budget): each builds its own Trainer (Accelerator, data, model, DDP wrapper, start-up checks),
   starts the run (config.json, trackers), trains one step and saves a checkpoint; every second start
   replaces the run before it with --overwrite_output_dir.
Each process writes ROOT/rank<R>.json with its outcomes; the test compares them.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from diffusers_optim.config import parse_train_args
from diffusers_optim.distributed import StopRequest, decided_on_main
from diffusers_optim.errors import UserError
from diffusers_optim.trainer import Trainer, build_accelerator, check_output_dir


def outcome(call) -> dict:
    try:
        return {"result": str(call())}
    except UserError as err:
        return {"error": str(err), "quiet": getattr(err, "quiet", False)}


def start_and_step(cfg) -> int:
    """What Trainer.train() does up to its first checkpoint (train() itself ends the process group at the end)."""
    trainer = Trainer(cfg)
    trainer.start()
    trainer.t_start = time.perf_counter()
    trainer.train_step(iter(trainer.build_loader()))
    trainer.step += 1
    trainer.save_checkpoint()
    return trainer.step


def main() -> None:
    root, n, flags = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    # built first, as the script does: it is what makes the two processes one gloo group
    state = build_accelerator(parse_train_args([*flags, "--output_dir", str(root / "unused")]))
    checks, calls, starts = [], [], []

    def check(out: Path):
        calls.append(str(out))  # which process ran the check itself
        return check_output_dir(parse_train_args([*flags, "--output_dir", str(out)]), out)

    held = root / "held"
    if state.is_main_process:
        held.mkdir(parents=True)
        (held / "metrics.jsonl").write_text('{"step": 1}\n')
        (root / "a_file").write_text("not a folder")
    folders = [root / f"fresh-{i}" / "run" for i in range(n)] + [held, root / "a_file" / "run"]
    for out in folders:
        state.wait_for_everyone()  # both processes reach the check together
        checks.append(outcome(lambda out=out: decided_on_main(state, lambda: check(out))))
    agreed = []
    for signalled, diverged in ((False, False), (True, False), (False, True)):
        request = StopRequest(state)
        with request.listening():
            if signalled and state.process_index == 1:  # one process only: the other learns it by agreeing
                os.kill(os.getpid(), signal.SIGTERM)
            stop = request.agreed(diverged=diverged and state.is_main_process)
        agreed.append(None if stop is None else [stop.signal_name, stop.diverged])
    for i in range(n):
        state.wait_for_everyone()
        # every second start replaces the run just made: clearing it and rewriting config.json race too
        again = ["--overwrite_output_dir"] if i % 2 else []
        cfg = parse_train_args([*flags, "--output_dir", str(root / f"start-{i // 2}"), *again])
        starts.append(outcome(lambda cfg=cfg: start_and_step(cfg)))
    record = {"checks": checks, "calls": calls, "agreed": agreed, "starts": starts}
    (root / f"rank{state.process_index}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
