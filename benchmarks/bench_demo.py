"""`make demo` end to end, this code against another checkout of the project (e.g. before a change), back to back.

Each tree runs its own Makefile's demo comparison (DEMO_OPTIMIZERS and DEMO_FLAGS read from it) with its own
code (PYTHONPATH), one after the other, in ABBA order when --repeats > 1. Reported per tree: wall seconds and the
CPU seconds of the whole process tree (steadier on a shared machine), with the load average. --scale shrinks the
step counts and every interval in proportion (not the sample counts), for a machine too busy for the full demo.

    git archive BASE_COMMIT | tar -x -C /tmp/base
    python benchmarks/bench_demo.py --baseline /tmp/base                  # the full demo, twice
    python benchmarks/bench_demo.py --baseline /tmp/base --scale 0.25     # a quarter of every count
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# sample counts stay: the quality metrics need their sample size (so a scaled demo weighs evaluation more)
SCALED = ("max_train_steps", "lr_warmup_steps", "logging_steps", "validation_steps", "sample_steps", "eval_steps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="another checkout of the project (its Makefile and code)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the demo's steps and counts (0 < s <= 1)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tree, in ABBA order")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (Path(args.baseline) / "Makefile").is_file():
        p.error(f"--baseline {args.baseline}: no Makefile there")
    if not 0 < args.scale <= 1 or args.repeats < 1:
        p.error("--scale must be in (0, 1] and --repeats at least 1")
    return args


def make_variable(makefile: Path, name: str) -> list[str]:
    """A `NAME ?= ...` variable of the Makefile (with its line continuations), split like the shell would."""
    text = makefile.read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*\??=(.*)$", text, re.M)
    if match is None:
        raise SystemExit(f"error: {makefile} defines no {name}")
    return shlex.split(match.group(1))


def scaled(flags: list[str], scale: float) -> list[str]:
    """The demo's flags with every count in SCALED multiplied by scale (at least 1)."""
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag.lstrip("-") in SCALED:
            out[i + 1] = str(max(1, round(int(out[i + 1]) * scale)))
    return out


def demo_command(tree: Path, output_dir: Path, scale: float) -> list[str]:
    makefile = tree / "Makefile"
    return [sys.executable, "-m", "diffusers_optim.cli", "compare", "--optimizers",
            *make_variable(makefile, "DEMO_OPTIMIZERS"), "--seeds", "0", "--num_parallel", "2",
            "--output_dir", str(output_dir), *scaled(make_variable(makefile, "DEMO_FLAGS"), scale)]


def run_demo(tree: Path, work: Path, scale: float, tag: str) -> dict[str, float | str]:
    """One demo with the tree's own code; wall and CPU seconds of the whole process tree."""
    env = dict(os.environ, PYTHONPATH=str(tree), WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    out = work / tag
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with (work / f"{tag}.log").open("w") as log:
        code = subprocess.run(demo_command(tree, out, scale), cwd=tree, env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"error: the demo of {tree} failed (exit {code}); see {work / f'{tag}.log'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_start": load, "load_end": os.getloadavg()[0],
            "val_loss": final_val_losses(out)}


def final_val_losses(comparison: Path) -> dict[str, float]:
    losses = {}
    for summary in sorted(comparison.glob("runs/*/run_summary.json")):
        losses[summary.parent.name] = json.loads(summary.read_text())["final"].get("val/loss")
    return losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trees = {"this": ROOT, "baseline": Path(args.baseline).resolve()}
    order = [name for r in range(args.repeats) for name in (("this", "baseline") if r % 2 else ("baseline", "this"))]
    results: dict[str, list] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            results[name].append(run_demo(trees[name], Path(tmp), args.scale, f"{name}-{i}"))
            print(f"{name}: {results[name][-1]['wall_s']:.0f} s wall, {results[name][-1]['cpu_s']:.0f} s CPU",
                  file=sys.stderr)
    mean = {name: {k: sum(r[k] for r in rs) / len(rs) for k in ("wall_s", "cpu_s")} for name, rs in results.items()}
    report = {"scale": args.scale, "repeats": args.repeats, "runs": results, "mean": mean,
              "speedup_wall": mean["baseline"]["wall_s"] / mean["this"]["wall_s"],
              "speedup_cpu": mean["baseline"]["cpu_s"] / mean["this"]["cpu_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"make demo at scale {args.scale}: this tree {mean['this']['wall_s']:.0f} s wall / "
              f"{mean['this']['cpu_s']:.0f} s CPU, baseline {mean['baseline']['wall_s']:.0f} s / "
              f"{mean['baseline']['cpu_s']:.0f} s; speedup {report['speedup_wall']:.2f}x wall, "
              f"{report['speedup_cpu']:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
