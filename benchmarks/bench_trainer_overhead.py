"""Trainer overhead: images/s of the Trainer against a bare training loop of the same model, side by side.

Both loops train the same UNet preset (same init), at the same batch size, with the same AdamW hyperparameters
and the same DDPMScheduler, in one process. The Trainer runs with every metric on (timestep-bucket meter,
grad norm, clipping, update ratio and a reduce on log steps, LR schedule, optionally EMA), driven through
`Trainer.run_step`, the method `Trainer.train` calls once per step. The bare loop is what a user would
write without any metrics: noise, forward, MSE, backward, step.

The two take turns step by step (--block_steps; ABBA order), so a change in the machine's load hits both alike;
each repeat is one logging interval of both, and every figure is a median over the repeats. Two throughputs are reported for the Trainer: between log steps (the steps that only
accumulate metrics on device) and amortized over whole logging intervals (log steps included).

    python benchmarks/bench_trainer_overhead.py                      # tiny and small, 16px, batch 64
    python benchmarks/bench_trainer_overhead.py --presets small --batch_size 32 --repeats 9 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench_trainer_overhead")

TARGET_RATIO = 0.95  # issue 3: the Trainer keeps at least this fraction of the bare loop's throughput


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="UNet presets to measure")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--logging_steps", type=int, default=10, help="the Trainer's log interval")
    p.add_argument(
        "--block_steps",
        type=int,
        default=1,
        help="steps one loop runs before the other takes over (1: step by step, the best pairing)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed logging intervals (each: --logging_steps steps of both loops); medians are reported",
    )
    p.add_argument(
        "--warmup_steps",
        type=int,
        default=10,
        help="untimed steps per loop first (rounded up to whole logging intervals)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)"
    )
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="the Trainer's clipping (0: off)")
    p.add_argument("--use_ema", action="store_true", help="the Trainer also keeps an EMA of the weights")
    p.add_argument(
        "--output_dir", default=None, help="where the Trainer writes (default: a temporary folder)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name in ("batch_size", "logging_steps", "block_steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def usable_cores() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    """Per-step wall time is only true on a GPU if the host waits for the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the two loops ----------------------------------------------------------------------------------------
class TrainerLoop:
    """The real Trainer, one `Trainer.run_step` per call, as `Trainer.train` runs it (minus the progress bar)."""

    def __init__(self, args: argparse.Namespace, preset: str, output_dir: Path, **overrides: Any):
        """`overrides`: further TrainConfig fields (benchmarks/gpu_throughput.py sets mixed precision and compile)."""
        from tqdm.auto import tqdm

        from diffusers_optim.config import TrainConfig
        from diffusers_optim.trainer import Trainer

        settings = dict(
            model_preset=preset,
            resolution=args.resolution,
            train_batch_size=args.batch_size,
            optimizer="adamw",
            max_grad_norm=args.max_grad_norm,
            use_ema=args.use_ema,
            logging_steps=args.logging_steps,
            report_to="none",
            output_dir=str(output_dir),
            # Never the last step, and no validation, samples or checkpoints: only training and logging are timed.
            max_train_steps=10**9,
            validation_steps=0,
            sample_steps=0,
            eval_steps=0,
            checkpointing_steps=0,
        )
        self.trainer = Trainer(TrainConfig(**{**settings, **overrides}))
        self.trainer.start()
        if self.trainer.cfg.torch_compile:  # as Trainer.train does: the compile before step 1, timed apart
            self.trainer.compile_s = self.trainer.warm_up_compile()
        self.batches = iter(self.trainer.build_loader())
        self.bar = tqdm(disable=True)
        self.trainer.t_start = time.perf_counter()

    def step(self) -> bool:
        """One optimizer step plus its after-step work; returns whether it was a log step."""
        self.trainer.run_step(self.batches, self.bar)
        return self.trainer.is_log_step(self.trainer.step)


class BareLoop:
    """The same model, optimizer and noise scheduler with nothing but the training maths."""

    def __init__(self, reference: TrainerLoop):
        from diffusers_optim.models import build_noise_scheduler, build_unet
        from diffusers_optim.optim import create_optimizer

        t = reference.trainer
        cfg = t.cfg
        self.device = t.accelerator.device
        self.model = (
            build_unet(cfg.model_preset, cfg.resolution, t.channels, cfg.init_seed).to(self.device).train()
        )
        self.noise_scheduler = build_noise_scheduler(
            cfg.ddpm_num_steps, cfg.ddpm_beta_schedule, cfg.prediction_type
        )
        self.optimizer = create_optimizer(self.model, t.spec.name, **t.hparams)
        loader = torch.utils.data.DataLoader(
            t.data.train, batch_size=cfg.train_batch_size, shuffle=True, drop_last=True
        )
        self.batches = forever(loader)
        self.num_timesteps = cfg.ddpm_num_steps

    def step(self) -> bool:
        clean = next(self.batches).to(self.device)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.num_timesteps, (clean.shape[0],), device=self.device)
        pred = self.model(self.noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return False


def forever(loader: torch.utils.data.DataLoader) -> Iterator[torch.Tensor]:
    while True:
        yield from loader


# ---- timing --------------------------------------------------------------------------------------------
def timed_block(
    step: Callable[[], bool], num_steps: int, device: torch.device
) -> list[tuple[float, float, bool]]:
    """(wall seconds, process CPU seconds, is_log_step) of each of num_steps steps."""
    times = []
    for _ in range(num_steps):
        wall, cpu = time.perf_counter(), time.process_time()
        is_log = step()
        sync(device)
        times.append((time.perf_counter() - wall, time.process_time() - cpu, is_log))
    return times


def images_per_sec(
    times: list[tuple[float, float, bool]], batch_size: int, log_steps: bool = True, clock: int = 0
) -> float:
    """Throughput of a block by wall (clock=0) or CPU (clock=1) time; with log_steps=False, of non-log steps."""
    seconds = [t[clock] for t in times if log_steps or not t[2]]
    return batch_size * len(seconds) / max(sum(seconds), 1e-9)


def timed_interval(
    loops: list[tuple[str, Callable[[], bool]]], num_steps: int, block_steps: int, device: torch.device
) -> dict[str, list[tuple[float, float, bool]]]:
    """num_steps steps of each loop, taking turns every block_steps steps in ABBA order, so drift hits both alike."""
    times: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, _ in loops}
    order = list(loops)
    for start in range(0, num_steps, block_steps):
        for name, step in order:
            times[name] += timed_block(step, min(block_steps, num_steps - start), device)
        order.reverse()
    return times


def measure_preset(args: argparse.Namespace, preset: str, output_dir: Path) -> dict[str, Any]:
    """The Trainer and the bare loop of one preset, timed side by side (measure_loops)."""
    trainer = TrainerLoop(args, preset, output_dir)
    return measure_loops(args, preset, trainer, BareLoop(trainer))


def measure_loops(args: argparse.Namespace, preset: str, trainer: TrainerLoop, bare: BareLoop) -> dict[str, Any]:
    """Warm both loops up, then time them interleaved, one logging interval per repeat; medians of the repeats."""
    device, interval = bare.device, args.logging_steps
    loops = [("trainer", trainer.step), ("bare", bare.step)]
    # Whole logging intervals, so every timed interval of the Trainer ends on exactly one log step.
    timed_interval(loops, -(-args.warmup_steps // interval) * interval, args.block_steps, device)
    rows = []
    for r in range(args.repeats):
        times = timed_interval(loops if r % 2 == 0 else loops[::-1], interval, args.block_steps, device)
        bare_ips = images_per_sec(times["bare"], args.batch_size)
        between = images_per_sec(times["trainer"], args.batch_size, log_steps=False)
        amortized = images_per_sec(times["trainer"], args.batch_size)
        # CPU time counts only this process's work: on a shared machine it is the steadier of the two clocks.
        cpu_between = images_per_sec(times["trainer"], args.batch_size, log_steps=False, clock=1)
        rows.append(
            {
                "bare": bare_ips,
                "between": between,
                "amortized": amortized,
                "cpu_ratio": cpu_between / images_per_sec(times["bare"], args.batch_size, clock=1),
                "log_step_s": statistics.median(t[0] for t in times["trainer"] if t[2]),
            }
        )
        logger.info(
            f"{preset} interval {r + 1}/{args.repeats}: bare {bare_ips:.0f} img/s, trainer {between:.0f} "
            f"between log steps, {amortized:.0f} amortized"
        )
    return summarize(preset, rows, args.batch_size, sum(p.numel() for p in bare.model.parameters()))


def summarize(
    preset: str, rows: list[dict[str, float]], batch_size: int, num_parameters: int
) -> dict[str, Any]:
    """Medians over the repeats; each ratio is the median of per-repeat ratios (paired, so drift cancels)."""

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "preset": preset,
        "num_parameters": num_parameters,
        "bare_images_per_sec": median("bare"),
        "trainer_between_log_images_per_sec": median("between"),
        "trainer_amortized_images_per_sec": median("amortized"),
        "ratio_between_log": statistics.median(row["between"] / row["bare"] for row in rows),
        "ratio_amortized": statistics.median(row["amortized"] / row["bare"] for row in rows),
        "cpu_time_ratio_between_log": median("cpu_ratio"),
        "bare_step_ms": 1000 * batch_size / median("bare"),
        "trainer_log_step_ms": 1000 * median("log_step_s"),
        "repeats": rows,
    }


# ---- output --------------------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"trainer vs bare loop: {s['resolution']}px, batch {s['batch_size']}, AdamW, logging_steps "
        f"{s['logging_steps']}, clipping {s['max_grad_norm'] or 'off'}, EMA {'on' if s['use_ema'] else 'off'}",
        f"torch {s['torch']} on {s['device']}, torch.set_num_threads({s['threads']}); median of {s['repeats']} "
        f"logging intervals, the loops taking turns every {s['block_steps']} step(s)",
        "",
        f"{'preset':<8} {'params':>9} {'bare img/s':>11} {'trainer img/s':>14} {'ratio':>6}  "
        f"{'amortized img/s':>16} {'ratio':>6}  {'cpu ratio':>9}  {'log step ms':>11} {'bare step ms':>12}",
        f"{'':<8} {'':>9} {'':>11} {'(between logs)':>14} {'':>6}  {'(with log steps)':>16}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['preset']:<8} {r['num_parameters']:>9,} {r['bare_images_per_sec']:>11.0f} "
            f"{r['trainer_between_log_images_per_sec']:>14.0f} {r['ratio_between_log']:>6.3f}  "
            f"{r['trainer_amortized_images_per_sec']:>16.0f} {r['ratio_amortized']:>6.3f}  "
            f"{r['cpu_time_ratio_between_log']:>9.3f}  "
            f"{r['trainer_log_step_ms']:>11.1f} {r['bare_step_ms']:>12.1f}"
        )
    lines += [
        "",
        "ratios are trainer/bare, medians over paired blocks; cpu ratio: between log steps, by process CPU "
        "time",
        f"target: wall-clock ratio between log steps >= {TARGET_RATIO}",
    ]
    for r in report["results"]:
        verdict = "meets" if r["ratio_between_log"] >= TARGET_RATIO else "MISSES"
        lines.append(f"  {r['preset']}: {verdict} the target ({r['ratio_between_log']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        root = (
            Path(args.output_dir)
            if args.output_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        results = [measure_preset(args, preset, root / preset) for preset in args.presets]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "output_dir")},
            "threads": threads,
            "torch": torch.__version__,
            "device": device,
            "target_ratio": TARGET_RATIO,
        },
        "results": results,
    }
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    # A UserError (e.g. an --output_dir that holds a run) becomes one line on stderr and exit status 2.
    from diffusers_optim.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
