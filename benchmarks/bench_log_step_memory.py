"""Peak memory of log steps against the other steps, in a real Trainer (issue 13: at most 5 % above).

A log step does more than a plain step: a snapshot of the weights before the optimizer step (for
train/update_ratio), one reduce and one host copy of the interval's sums, the parameter norm, a metrics line.
This benchmark trains one real Trainer (`small` preset by default; validation, samples, quality metrics and
checkpoints off) through `Trainer.run_step`, the method `Trainer.train` calls once per step, and measures every
step's own peak:

- CPU (Linux): before the step the process's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`, which sets
  VmHWM to the current RSS); after it VmHWM is read. The step's growth is that peak minus the RSS it started at.
- CUDA: `torch.cuda.reset_peak_memory_stats` before, `torch.cuda.max_memory_allocated` after.

Reported: the highest peak of log steps against the highest and the median peak of the other steps, and the
same for the growth within a step. Gradient-probe steps (every --grad_probe_steps) are counted apart.

    python benchmarks/bench_log_step_memory.py                       # small, 32 px, batch 32, 60 steps
    python benchmarks/bench_log_step_memory.py --preset tiny --steps 20 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from a test
from bench_grad_probes import Stepper, build_trainer, reset_peak_rss, rss_mb  # noqa: E402

logger = logging.getLogger("bench_log_step_memory")

MEMORY_TARGET = 1.05  # issue 13: peak memory of a log step at most 5 % above the other steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from diffusers_optim.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="UNet preset")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--logging_steps", type=int, default=5, help="a log step every N steps")
    p.add_argument("--steps", type=int, default=60, help="measured steps")
    p.add_argument("--warmup_steps", type=int, default=3, help="steps first, unmeasured (optimizer state, allocator)")
    p.add_argument("--grad_probe_steps", type=int, default=TrainConfig.grad_probe_steps,
                   help="gradient probes every N steps (the Trainer's default); their steps are reported apart")
    p.add_argument("--num_validation_images", type=int, default=TrainConfig.num_validation_images,
                   help="the held-out set")
    p.add_argument("--grad_probe_images", type=int, default=TrainConfig.grad_probe_images,
                   help="the probe batch: the first N held-out images")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "grad_probe_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.logging_steps < 2:
        p.error("--logging_steps must be at least 2 (steps between log steps are the comparison)")
    if args.steps < 2 * args.logging_steps:
        p.error("--steps must hold at least two log steps (2 x --logging_steps)")
    return args


class StepPeak:
    """The peak memory of one step and its growth over the memory the step started with, in MB."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda and not Path("/proc/self/clear_refs").exists():
            raise SystemExit("error: per-step peak RSS needs Linux (/proc/self/clear_refs); run it on Linux or a GPU")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            self.at_start = rss_mb("VmRSS")

    def stop(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = rss_mb("VmHWM")
        return peak, peak - self.at_start


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Each step's peak and growth, by kind of step (log, probe, other), in one real Trainer."""
    trainer, batches = build_trainer(args, args.preset, out, args.grad_probe_steps)
    stepper = Stepper(trainer, batches)
    stepper.run(args.warmup_steps)
    meter = StepPeak(trainer.accelerator.device)
    steps: dict[str, list[tuple[float, float]]] = {"other": [], "log": [], "probe": []}
    for i in range(args.steps):
        step = trainer.step + 1
        kind = "probe" if step % args.grad_probe_steps == 0 else "log" if trainer.is_log_step(step) else "other"
        meter.start()
        stepper.run(1)
        steps[kind].append(meter.stop())
        if (i + 1) % 10 == 0:
            logger.info(f"{i + 1}/{args.steps} steps measured")
    params_mb = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20
    other_peaks, other_growth = [p for p, _ in steps["other"]], [g for _, g in steps["other"]]
    result: dict[str, Any] = {
        "preset": args.preset, "memory": "device" if meter.cuda else "rss", "params_mb": params_mb,
        "steps": {kind: len(v) for kind, v in steps.items()},
        "other_peak_max_mb": max(other_peaks), "other_peak_median_mb": statistics.median(other_peaks),
        "other_growth_max_mb": max(other_growth), "other_growth_median_mb": statistics.median(other_growth),
    }
    for kind in ("log", "probe"):
        if steps[kind]:
            peak, growth = max(p for p, _ in steps[kind]), max(g for _, g in steps[kind])
            result.update({f"{kind}_peak_max_mb": peak, f"{kind}_growth_max_mb": growth,
                           f"{kind}_vs_other_max": peak / max(other_peaks),
                           f"{kind}_vs_other_median": peak / statistics.median(other_peaks)})
    return result


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def format_table(report: dict[str, Any]) -> str:
    s, r = report["settings"], report["result"]
    what = "device memory (max_memory_allocated)" if r["memory"] == "device" else "process RSS (VmHWM per step)"
    lines = [f"{s['preset']} preset ({r['params_mb']:.1f} MB of weights), {s['resolution']} px, batch "
             f"{s['batch_size']}, log step every {s['logging_steps']}, probes every {s['grad_probe_steps']}; "
             f"{what}; torch.set_num_threads({s['threads']}); load average {s['load_before']} -> {s['load_after']}",
             f"steps measured: {r['steps']['other']} other, {r['steps']['log']} log, {r['steps']['probe']} probe", "",
             f"{'steps':<6} {'peak max MB':>11} {'growth max MB':>13} {'vs other max':>12} {'vs other median':>15}",
             f"{'other':<6} {r['other_peak_max_mb']:>11.1f} {r['other_growth_max_mb']:>13.1f} {'':>12} {'':>15}"]
    for kind in ("log", "probe"):
        if f"{kind}_peak_max_mb" in r:
            lines.append(f"{kind:<6} {r[f'{kind}_peak_max_mb']:>11.1f} {r[f'{kind}_growth_max_mb']:>13.1f} "
                         f"{r[f'{kind}_vs_other_max']:>12.3f} {r[f'{kind}_vs_other_median']:>15.3f}")
    lines.append(f"(median of other steps: peak {r['other_peak_median_mb']:.1f} MB, growth "
                 f"{r['other_growth_median_mb']:.1f} MB)")
    if "log_vs_other_max" in r:
        verdict = "meets" if r["log_vs_other_max"] <= MEMORY_TARGET else "MISSES"
        lines.append(f"log steps {verdict} the target: peak <= {MEMORY_TARGET} x other steps' "
                     f"({r['log_vs_other_max']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp) / args.preset)
    report = {"settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "load_before": load_before, "load_after": load_average()},
              "result": result}
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
