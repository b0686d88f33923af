"""What `compare --backend ray` costs over the local pool: 8 tiny runs each way, side by side, wall-clock ratio.

Both backends run the same comparison (2 optimizers x 4 seeds of the tiny preset on 8x8 digits, a few steps, so
start-up and scheduling dominate) with the same number of runs at once: the local pool with --num_parallel P, Ray
on a local cluster of P CPUs with --cpus_per_run 1; every trainer gets OMP_NUM_THREADS=cores/P either way. The
cluster is started once (its start-up is timed apart: a real cluster runs for the whole study), then the two
backends alternate in ABBA order, each comparison in a fresh folder, through compare.run_comparison as the CLI
calls it.

    python benchmarks/bench_ray_overhead.py [--rounds 2] [--first local] [--parallel 2] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

OPTIMIZERS = ["adamw:lr=1e-3", "sgd:lr=0.05,momentum=0.9"]
SEEDS = ["0", "1", "2", "3"]  # x 2 optimizers = 8 runs
TINY = ["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--ddpm_num_steps", "100",
        "--num_validation_images", "8", "--validation_steps", "0", "--logging_steps", "10", "--lr_warmup_steps", "1",
        "--sample_steps", "0", "--num_samples", "4", "--num_inference_steps", "2", "--num_eval_samples", "16",
        "--report_to", "none"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, each one comparison per backend, in ABBA order")
    p.add_argument("--first", choices=("local", "ray"), default="local", help="the backend of the first round's A")
    p.add_argument("--parallel", type=int, default=2, help="runs at once on either backend")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = p.parse_args(argv)
    for name in ("rounds", "parallel", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def comparison_argv(backend: str, out: Path, args: argparse.Namespace) -> list[str]:
    argv = ["--optimizers", *OPTIMIZERS, "--seeds", *SEEDS, "--output_dir", str(out), "--progress_every", "60",
            *TINY, "--max_train_steps", str(args.steps)]
    if backend == "local":
        return [*argv, "--num_parallel", str(args.parallel)]
    return [*argv, "--backend", "ray", "--cpus_per_run", "1"]


def timed_comparison(backend: str, out: Path, args: argparse.Namespace) -> float:
    """Wall seconds of one comparison, planning to report; every run must complete."""
    from diffusers_optim import compare

    t0 = time.perf_counter()
    paths = compare.run_comparison(compare.parse_comparison(comparison_argv(backend, out, args)))
    seconds = time.perf_counter() - t0
    summary = json.loads(Path(paths["summary_json"]).read_text())
    statuses = [row["status"] for row in summary["runs"]]
    if statuses != ["complete"] * 8:
        raise SystemExit(f"{backend}: not every run completed ({statuses}); see {out / 'logs'}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import ray

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    os.environ.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TQDM_DISABLE": "1",
                       "RAY_USAGE_STATS_ENABLED": "0"})
    from diffusers_optim import compare

    with tempfile.TemporaryDirectory() as tmp:  # untimed: the first parse imports torch, diffusers and the trainer
        compare.parse_comparison(comparison_argv("local", Path(tmp), args))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.parallel, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    startup = time.perf_counter() - t0
    times: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
            for round_ in range(args.rounds):
                other = "ray" if args.first == "local" else "local"
                order = (args.first, other) if round_ % 2 == 0 else (other, args.first)  # ABBA
                for backend in order:
                    seconds = timed_comparison(backend, Path(tmp) / f"{backend}-{round_}", args)
                    times[backend].append(seconds)
                    if not args.json:
                        print(f"round {round_ + 1} {backend:>5}: {seconds:6.1f} s", flush=True)
    finally:
        ray.shutdown()
    result = {
        "runs": 8, "parallel": args.parallel, "steps": args.steps, "rounds": args.rounds,
        "cluster_startup_s": round(startup, 2),
        "local_s": [round(t, 2) for t in times["local"]], "ray_s": [round(t, 2) for t in times["ray"]],
        "ratio_median": round(statistics.median(times["ray"]) / statistics.median(times["local"]), 3),
        "ratio_per_round": [round(r / loc, 3) for r, loc in zip(times["ray"], times["local"])],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ray / local wall clock (median over rounds): {result['ratio_median']:.3f} "
              f"(per round {result['ratio_per_round']}); cluster start-up {startup:.1f} s, once; "
              f"load average at the end {result['load_average']}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
