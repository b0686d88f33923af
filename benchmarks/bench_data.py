"""Streamed image folders (issue 13): start-up, peak memory and throughput against folder size and in-memory data.

For a synthetic folder of `--small` and of `--large` 64x64 PNGs, and for the built-in digits (held in memory) at
the same model, batch and resolution, a child process builds the real Trainer, times start-up to the end of the
first optimizer step, then `--steps` more steps (img/s), and reports its peak RSS (the DataLoader workers are
separate processes whose memory is O(batch) and is not included). The variants take turns in each repeat, so the
machine's load hits them alike. Always exits 0.

    python benchmarks/bench_data.py                     # 1,000 vs 20,000 images, 3 repeats
    python benchmarks/bench_data.py --large 5000 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(folder: Path, n: int, size: int = 64) -> Path:
    """n smooth random RGB PNGs (made once; kept in --work_dir)."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.png")
    done.write_text(str(n))
    return folder


def child(args: argparse.Namespace) -> None:
    """Runs in its own process: start-up to the first step, then steady throughput, then peak RSS."""
    start = time.perf_counter()
    from diffusers_optim.config import parse_train_args
    from diffusers_optim.trainer import Trainer

    flags = ["--model_preset", "tiny", "--resolution", "64", "--train_batch_size", str(args.batch_size),
             "--max_train_steps", str(args.steps + 10), "--logging_steps", "0", "--validation_steps", "0",
             "--sample_steps", "0", "--num_validation_images", "8", "--lr_warmup_steps", "0",
             "--output_dir", args.child_out, "--report_to", "none"]
    if args.child_data != "digits":
        flags += ["--train_data_dir", args.child_data]
    trainer = Trainer(parse_train_args(flags))
    trainer.start()
    batches = iter(trainer.build_loader())
    trainer.train_step(batches)
    startup = time.perf_counter() - start
    for _ in range(3):  # warm-up, untimed
        trainer.train_step(batches)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batches)
    seconds = time.perf_counter() - t0
    print(json.dumps({"startup_s": startup, "images_per_sec": args.steps * args.batch_size / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers": trainer.num_workers}))


def run_child(data: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child_data", data, "--child_out", str(out), "--steps", str(args.steps),
           "--batch_size", str(args.batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "diffusers-optim-bench-data"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child_data", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_data:
        return child(args)
    work = Path(args.work_dir)
    variants = {f"folder {args.small}": str(make_folder(work / f"png{args.small}", args.small)),
                f"folder {args.large}": str(make_folder(work / f"png{args.large}", args.large)),
                "digits (in memory)": "digits"}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            with tempfile.TemporaryDirectory() as out:
                results[name].append(run_child(variants[name], Path(out) / "run", args))
    summary = {name: {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]}
               for name, runs in results.items()}
    small, large, digits = (summary[n] for n in variants)
    ratios = {"startup_large_vs_small": round(large["startup_s"] / small["startup_s"], 3),
              "rss_growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
              "throughput_large_folder_vs_digits": round(large["images_per_sec"] / digits["images_per_sec"], 3)}
    if args.json:
        print(json.dumps({"medians": summary, "ratios": ratios, "args": vars(args)}))
        return
    print(f"tiny UNet, 64 px, batch {args.batch_size}, {args.threads} torch thread(s), median of {args.repeats}")
    print(f"{'data':<22}{'start-up s':>12}{'img/s':>10}{'peak RSS MB':>13}{'workers':>9}")
    for name, m in summary.items():
        print(f"{name:<22}{m['startup_s']:>12.2f}{m['images_per_sec']:>10.1f}{m['peak_rss_mb']:>13.0f}{m['workers']:>9.0f}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
