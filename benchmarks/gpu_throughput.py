"""Seconds per step of the Trainer against a bare loop on a GPU: fp32/bf16/fp16, torch.compile off/on, three presets.

For each (preset, precision, compile) a child process trains the real Trainer (every metric on: bucket meter, grad
norm, clipping, update ratio on log steps, LR schedule; validation, samples and checkpoints off) and a bare loop of
the same UNet, AdamW and DDPMScheduler side by side, step by step in ABBA order (bench_trainer_overhead.py's
loops and timing, with `torch.cuda.synchronize` after every step). The bare loop is plain PyTorch: `torch.autocast`
for bf16/fp16, a `GradScaler` for fp16, `torch.compile(model)` for compile. One process per configuration, since
Accelerate's mixed precision is fixed per process and a failed one (out of memory) must not end the others.

    python benchmarks/gpu_throughput.py                                   # 3 presets x 3 precisions x compile off/on
    python benchmarks/gpu_throughput.py --presets ddpm-256 --precisions bf16 --compile on --batch_size 32
    python benchmarks/gpu_throughput.py --dry_run                         # no GPU: a tiny CPU pass of the script

Without a CUDA device it measures nothing and says so (exit 0); --dry_run runs the same path on the CPU at the
tiny preset, 8 px, to check that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from a test
from bench_trainer_overhead import BareLoop, TrainerLoop, measure_loops  # noqa: E402

PRESETS = ("small", "ddpm-cifar10", "ddpm-256")
PRECISIONS = ("fp32", "bf16", "fp16")
RESOLUTION = {"small": 32, "ddpm-cifar10": 32, "ddpm-256": 256, "tiny": 8}  # each preset at its usual size
BATCH = {"small": 128, "ddpm-cifar10": 128, "ddpm-256": 16, "tiny": 4}
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --mixed_precision of the Trainer
NO_CUDA = "no CUDA device: nothing measured (run it on a GPU machine; --dry_run checks the script on the CPU)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=[*PRESETS, "tiny"])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"], help="torch.compile arms")
    p.add_argument("--compile_mode", default="default", help="the Trainer's --compile_mode (the bare loop's mode=)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 128 (small, ddpm-cifar10), 16 (ddpm-256)")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (small, ddpm-cifar10), 256 (ddpm-256)")
    p.add_argument("--logging_steps", type=int, default=10, help="the Trainer's log interval (one repeat)")
    p.add_argument("--repeats", type=int, default=5, help="timed logging intervals per configuration")
    p.add_argument("--warmup_steps", type=int, default=10, help="untimed steps per loop first (after any compile)")
    p.add_argument("--dry_run", action="store_true", help="tiny preset, 8 px, fp32/bf16, eager, on the CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one configuration, in its own process
    args = p.parse_args(argv)
    for name in ("logging_steps", "repeats", "batch_size", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if args.dry_run:
        args.presets, args.compile, args.repeats, args.logging_steps, args.warmup_steps = ["tiny"], ["off"], 2, 2, 2
        args.precisions = [x for x in args.precisions if x != "fp16"] or ["fp32"]  # fp16 autocast needs a GPU
    return args


# ---- one configuration (child process) ----------------------------------------------------------------
class PrecisionBareLoop(BareLoop):
    """The bare loop in plain PyTorch at a precision: autocast for bf16/fp16, a GradScaler for fp16; compiled."""

    def __init__(self, reference: TrainerLoop, precision: str, compile_mode: str | None):
        super().__init__(reference)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        # compiled at its first steps, which are measure_loops' untimed warm-up steps
        self.forward = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model

    def step(self) -> bool:
        clean = next(self.batches).to(self.device)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.num_timesteps, (clean.shape[0],), device=self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pred = self.forward(self.noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return False


def run_configuration(config: dict[str, Any]) -> dict[str, Any]:
    """Time the Trainer against the bare loop for one (preset, precision, compile) in this process."""
    args = argparse.Namespace(**config["args"], block_steps=1, max_grad_norm=1.0, use_ema=False)
    compiled = config["compile"] == "on"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TrainerLoop(args, config["preset"], Path(tmp), mixed_precision=MIXED[config["precision"]],
                              torch_compile=compiled, compile_mode=args.compile_mode)
        compile_s = trainer.trainer.compile_s  # before the first log step, which logs and clears it
        bare = PrecisionBareLoop(trainer, config["precision"], args.compile_mode if compiled else None)
        result = {**measure_loops(args, config["preset"], trainer, bare), "compile_s": compile_s}
    device = trainer.trainer.accelerator.device
    result.update(config=config, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  trainer_s_per_step=1 / result["trainer_between_log_images_per_sec"] * args.batch_size,
                  bare_s_per_step=1 / result["bare_images_per_sec"] * args.batch_size,
                  # seconds per step, trainer over bare: 1.0 is no overhead (a median of image/s ratios inverted)
                  s_per_step_ratio=1 / result["ratio_between_log"],
                  s_per_step_ratio_amortized=1 / result["ratio_amortized"])
    return result


# ---- the grid of configurations (parent) -----------------------------------------------------------------
def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for preset in args.presets:
        shared = {"resolution": args.resolution or RESOLUTION[preset], "batch_size": args.batch_size or BATCH[preset],
                  "logging_steps": args.logging_steps, "repeats": args.repeats, "warmup_steps": args.warmup_steps,
                  "compile_mode": args.compile_mode}
        rows += [{"preset": preset, "precision": precision, "compile": compiled, "args": shared}
                 for precision in args.precisions for compiled in args.compile]
    return rows


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process; its failure (e.g. out of memory) is reported, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"config": config, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: list[dict[str, Any]]) -> str:
    device = next((r["device"] for r in results if "device" in r), "?")
    lines = [f"Trainer vs bare loop on {device}: seconds per step, side by side, median of paired logging intervals",
             "", f"{'preset':<13} {'prec':<5} {'compile':<7} {'batch':>5} {'px':>4} {'bare s/step':>11} "
                 f"{'trainer s/step':>14} {'ratio':>6} {'ratio w/ logs':>13} {'compile s':>9}"]
    for r in results:
        c = r["config"]
        head = f"{c['preset']:<13} {c['precision']:<5} {c['compile']:<7} {c['args']['batch_size']:>5} " \
               f"{c['args']['resolution']:>4}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]}")
            continue
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "-"
        lines.append(f"{head} {r['bare_s_per_step']:>11.4f} {r['trainer_s_per_step']:>14.4f} "
                     f"{r['s_per_step_ratio']:>6.3f} {r['s_per_step_ratio_amortized']:>13.3f} {compile_s:>9}")
    lines += ["", "ratio: trainer s/step over bare s/step between log steps (1.0: no overhead); "
                  "ratio w/ logs: over whole logging intervals, log steps included"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_configuration(json.loads(args.child))))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    results = []
    for config in configurations(args):
        print(f"{config['preset']} {config['precision']} compile {config['compile']} ...", file=sys.stderr)
        results.append(run_child(config))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
