"""Seconds per training step: our trainer (eager and compiled) against diffusers' own example script, side by side.

Every arm trains the same UNet layout (by default the small preset's, 32 px RGB) at batch 16 with AdamW 1e-4 on
the same images, one torch thread per process, all arms at the same time (so the machine's load hits them
alike). Each runs under benchmarks/step_clock.py, which timestamps every optimizer step by wall and process CPU
clocks and ends the process after --steps steps. Steady state is the mean over steps (--steady_from, --steps]:
log steps included, compile excluded. The compile is measured separately: once cold (a fresh cache, the arm
alone) and once as the side-by-side run pays it (warm cache), both as the trainer's perf/compile_s.

The other arms exercise each speed flag on whatever device the trainer finds (on a GPU: CUDA graphs through
reduce-overhead, channels_last, TF32); without --peer the ratios are against our eager arm.

    python benchmarks/bench_vs_peer.py --peer ../shared/peer/train_unconditional.py
    python benchmarks/bench_vs_peer.py --peer PEER --steps 60 --compile_mode max-autotune --json
    python benchmarks/bench_vs_peer.py --preset ddpm-cifar10 --sequential \
        --arms ours ours-unfused ours-compile ours-cudagraphs ours-channels-last ours-tf32     # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLOCK = ROOT / "benchmarks" / "step_clock.py"
OURS = ROOT / "train_scripts" / "train_unconditional.py"
TARGETS = {"ours-compile": 0.5, "ours": 1.0}  # issue 15: seconds/step relative to the peer
ARM_FLAGS = {  # our arms: the trainer's flags on top of the shared ones
    "ours": [],
    "ours-compile": ["--torch_compile"],  # with --compile_mode
    "ours-cudagraphs": ["--torch_compile", "--compile_mode", "reduce-overhead"],
    "ours-unfused": ["--optimizer_args", "fused=false"],
    "ours-channels-last": ["--channels_last"],
    "ours-tf32": ["--allow_tf32"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default=None, help="path of diffusers' examples/.../train_unconditional.py")
    p.add_argument("--arms", nargs="+", default=None, choices=["peer", *ARM_FLAGS],
                   help="default: peer ours ours-compile (ours ours-compile without --peer)")
    p.add_argument("--preset", default="small", help="our UNet preset whose layout every arm trains")
    p.add_argument("--sequential", action="store_true", help="one arm at a time (a single GPU), not side by side")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm")
    p.add_argument("--steady_from", type=int, default=10, help="steady state: the steps after this one")
    p.add_argument("--compile_mode", default="default", help="--compile_mode of the compiled arm")
    p.add_argument("--compile_cache", default=None,
                   help="inductor cache folder (default: a fresh one, so the cold compile is measured)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--work_dir", default=None, help="keep data, logs and step times here (default: temporary)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.arms is None:
        args.arms = ["peer", "ours", "ours-compile"] if args.peer else ["ours", "ours-compile"]
    if "peer" in args.arms and not args.peer:
        p.error("the peer arm needs --peer PATH")
    if args.peer and not Path(args.peer).is_file():
        p.error(f"--peer {args.peer}: no such file")
    if not 0 < args.steady_from < args.steps:
        p.error("--steady_from must be between 0 and --steps")
    return args


# ---- inputs shared by every arm ------------------------------------------------------------------------
def write_images(folder: Path, resolution: int) -> int:
    """scikit-learn's digits as RGB PNGs at the benchmark's resolution (an image folder both scripts read)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    images = load_digits().images
    for i, image in enumerate(images):
        gray = Image.fromarray((image * (255 / 16)).astype("uint8"))
        gray.resize((resolution, resolution), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    return len(images)


def write_unet_config(folder: Path, preset: str, resolution: int) -> Path:
    """The preset's layout for RGB at this resolution, as a config both scripts load."""
    from diffusers_optim.models import build_unet

    build_unet(preset, resolution, 3, 0).save_config(folder)
    return folder


def arm_command(arm: str, args: argparse.Namespace, work: Path, data: Path, unet: Path) -> list[str]:
    clock = [sys.executable, str(CLOCK), "--out", str(work / f"{arm}.steps.jsonl"), "--stop_after", str(args.steps),
             "--"]
    common = ["--train_data_dir", str(data), "--resolution", str(args.resolution), "--model_config_name_or_path",
              str(unet), "--train_batch_size", str(args.batch_size), "--learning_rate", "1e-4",
              "--mixed_precision", "no", "--output_dir", str(work / arm)]
    if arm == "peer":  # its defaults otherwise: AdamW, clipping at 1.0, cosine schedule, TensorBoard every step
        return [*clock, args.peer, *common, "--max_train_steps", str(10 * args.steps), "--num_epochs", "1000",
                "--cache_dir", str(work / "hf_cache"), "--checkpointing_steps", str(10**6)]
    ours = [*clock, str(OURS), *common, "--optimizer", "adamw", "--max_train_steps", str(10 * args.steps),
            "--logging_steps", "10", "--validation_steps", "0", "--sample_steps", "0", "--eval_steps", "0",
            "--report_to", "none", "--overwrite_output_dir"]
    if arm == "ours-compile":
        return [*ours, *ARM_FLAGS[arm], "--compile_mode", args.compile_mode]
    return [*ours, *ARM_FLAGS[arm]]


def arm_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("WANDB_MODE", None)
    return env


# ---- running and reading ---------------------------------------------------------------------------------
def run_arms(commands: dict[str, list[str]], env: dict[str, str], work: Path) -> dict[str, float]:
    """Start every arm at once and wait; returns each arm's wall seconds. A failed arm stops the benchmark."""
    if len(commands) > 1 and env.get("BENCH_SEQUENTIAL"):
        return {arm: run_arms({arm: cmd}, {k: v for k, v in env.items() if k != "BENCH_SEQUENTIAL"}, work)[arm]
                for arm, cmd in commands.items()}
    procs, started = {}, time.perf_counter()
    for arm, cmd in commands.items():
        log = (work / f"{arm}.log").open("w")
        procs[arm] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    seconds = {}
    for arm, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        seconds[arm] = time.perf_counter() - started
        if code != 0:
            tail = (work / f"{arm}.log").read_text().splitlines()[-15:]
            sys.exit(f"error: arm {arm} exited with status {code}:\n" + "\n".join(tail))
    return seconds


def steady_state(path: Path, steady_from: int, steps: int) -> dict[str, float]:
    """Mean wall and CPU seconds per step over (steady_from, steps], and the median wall step."""
    rows = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
    if steps not in rows:
        raise SystemExit(f"error: {path} has {len(rows)} steps, fewer than --steps {steps}")
    n = steps - steady_from
    walls = [rows[s]["wall_s"] - rows[s - 1]["wall_s"] for s in range(steady_from + 1, steps + 1)]
    return {"wall_s_per_step": (rows[steps]["wall_s"] - rows[steady_from]["wall_s"]) / n,
            "cpu_s_per_step": (rows[steps]["cpu_s"] - rows[steady_from]["cpu_s"]) / n,
            "median_wall_s_per_step": statistics.median(walls),
            "first_step_wall_s": rows[1]["wall_s"]}


def compile_seconds(run_dir: Path) -> float | None:
    """The trainer's own perf/compile_s (logged with its first log step)."""
    with contextlib.suppress(FileNotFoundError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "perf/compile_s" in record:
                return record["perf/compile_s"]
    return None


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data, unet = work / "data", work / "unet"
    num_images = write_images(data, args.resolution)
    write_unet_config(unet, args.preset, args.resolution)
    cache = Path(args.compile_cache) if args.compile_cache else work / "inductor_cache"
    env = {**arm_env(cache), **({"BENCH_SEQUENTIAL": "1"} if args.sequential else {})}
    commands = {arm: arm_command(arm, args, work, data, unet) for arm in args.arms}
    cold = None
    if "ours-compile" in commands:  # alone first: fills the cache, and its compile is the cold one
        cold_args = argparse.Namespace(**{**vars(args), "steps": 11})
        warm_up = {"ours-compile": arm_command("ours-compile", cold_args, work, data, unet)}
        run_arms(warm_up, env, work)
        cold = compile_seconds(work / "ours-compile")
    load_before = load_average()
    wall = run_arms(commands, env, work)
    results = {arm: {**steady_state(work / f"{arm}.steps.jsonl", args.steady_from, args.steps),
                     "process_wall_s": wall[arm]} for arm in commands}
    if "ours-compile" in results:
        results["ours-compile"].update(compile_cold_s=cold, compile_warm_s=compile_seconds(work / "ours-compile"))
    base = results.get("peer") or results.get("ours")
    for r in results.values() if base else ():
        r["cpu_ratio"] = r["cpu_s_per_step"] / base["cpu_s_per_step"]
        r["wall_ratio"] = r["wall_s_per_step"] / base["wall_s_per_step"]
    return {"settings": {**{k: v for k, v in vars(args).items() if k not in ("json", "work_dir")},
                         "num_images": num_images, "load_before": load_before, "load_after": load_average()},
            "results": results}


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    together = "one at a time" if s["sequential"] else "side by side"
    lines = [f"{s['preset']}-preset UNet, {s['resolution']} px RGB, batch {s['batch_size']}, AdamW 1e-4, one thread "
             f"per process, arms {together}; steady state = steps {s['steady_from'] + 1}-{s['steps']}; ratios "
             f"against {'the peer' if 'peer' in report['results'] else 'ours (eager)'}",
             f"load average before {s['load_before']}, after {s['load_after']}", "",
             f"{'arm':<14} {'cpu s/step':>10} {'wall s/step':>11} {'median wall':>11} {'cpu ratio':>9} "
             f"{'wall ratio':>10}  compile s (cold / warm)"]
    for arm, r in report["results"].items():
        compiled = (f"{r['compile_cold_s'] or float('nan'):.0f} / {r['compile_warm_s'] or float('nan'):.0f}"
                    if "compile_cold_s" in r else "")
        lines.append(f"{arm:<14} {r['cpu_s_per_step']:>10.3f} {r['wall_s_per_step']:>11.3f} "
                     f"{r['median_wall_s_per_step']:>11.3f} {r.get('cpu_ratio', float('nan')):>9.3f} "
                     f"{r.get('wall_ratio', float('nan')):>10.3f}  {compiled}")
    lines.append("")
    for arm, target in TARGETS.items():
        r = report["results"].get(arm)
        if r and "cpu_ratio" in r and "peer" in report["results"]:
            verdict = "meets" if r["cpu_ratio"] <= target else "MISSES"
            lines.append(f"{arm}: {verdict} the target cpu ratio <= {target} ({r['cpu_ratio']:.3f}; "
                         f"wall {r['wall_ratio']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        report = measure(args, work)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
