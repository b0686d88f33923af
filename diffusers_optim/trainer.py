"""The training loop. It wires `build_*` helpers and orchestrates; the maths lives in diffusion.py and metrics/.

One "step" is one optimizer step, whatever the process count or gradient accumulation. Data order, noise and
timesteps are pure functions of (seed, step, micro-batch), so every optimizer sees exactly the same batches, a
resumed run continues bit-for-bit, and N processes at batch B see what one process sees at batch N*B.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from diffusers_optim import checkpoint as ckpt
from diffusers_optim import rundir
from diffusers_optim.config import (
    LAYOUT_KEYS,
    BatchLayout,
    TrainConfig,
    experiment_differences,
    layout_changes,
    layout_refusal,
    parse_train_args,
    redact_argv,
    resolved_init_seed,
    resumed_layouts,
)
from diffusers_optim.data import build_datasets, num_failed_loads, num_loader_workers
from diffusers_optim.diffusion import min_snr_weights, per_sample_mse, training_target
from diffusers_optim.distributed import (
    Stop,
    StopRequest,
    decided_on_main,
    shelter_data_worker,
    slow_save_warning,
)
from diffusers_optim.errors import UserError
from diffusers_optim.metrics.keys import raw_key
from diffusers_optim.metrics.probes import GradProbe, build_probe_batch, first_moment_buffers
from diffusers_optim.metrics.train import TrainMetrics, UpdateSnapshot, param_norm
from diffusers_optim.metrics.validation import (
    ValidationMeter,
    validation_batches,
    validation_draw,
    validation_record,
)
from diffusers_optim.models import build_noise_scheduler, build_unet, check_resolution, load_unet_config
from diffusers_optim.optim import (
    ResolvedOptimizer,
    build,
    get_spec,
    optimizer_state_bytes,
    parse_optimizer_args,
    resolve,
)
from diffusers_optim.optim.groups import group_lrs, routing_keys
from diffusers_optim.progress import RunStatus, setup_console_logging
from diffusers_optim.sampling import BatchStream, generate_images, images_to_grid, micro_batch_noise
from diffusers_optim.schedules import build_lr_scheduler, default_warmup_steps, resolve_lr_scheduler
from diffusers_optim.speed import (
    channels_last_input,
    check_compiler,
    compile_for_training,
    configure_backends,
    mark_step_begin,
    share_compile_cache,
    to_channels_last,
    warm_up_compiled,
)
from diffusers_optim.tracking import MetricsLog, check_writable, init_trackers, resolve_trackers

logger = get_logger(__name__)

SAMPLE_SEED = 4321  # sampling noise of the grid and the quality metrics, offset by --seed
PROBE_SEED = 2468  # frozen noise/timesteps of the gradient probes' batch: the same for every optimizer and probe


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite steps); a checkpoint has been saved."""


def close_data_workers(batches) -> None:
    """Stop the data workers now (idempotent). They ignore SIGTERM (distributed.shelter_data_worker), so one left
    alive would hang the exit (multiprocessing terminates daemonic children at exit, then joins them), and an
    exception keeps the iterator alive in its traceback. torch offers no public close: `_shutdown_workers` is what
    its own `__del__` calls, and a worker it could not stop is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


class Trainer:
    """Trains one UNet2DModel with one registered optimizer and logs everything an optimizer study needs."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.trackers = resolve_trackers(cfg.report_to)
        self.spec = get_spec(cfg.optimizer)
        self.channels = 1 if _is_digits(cfg) else 3
        check_resolution(load_unet_config(cfg.model_preset, cfg.model_config_name_or_path), cfg.resolution)
        self.resolved = resolve_optimizer(cfg, self.spec)  # the one place the user's hyperparameters are resolved
        self.hparams = dict(self.resolved.kwargs)
        self.run_name = cfg.run_name or f"{self.spec.name}-lr{self.resolved.lr:g}-s{cfg.seed}"
        self.sample_seed = SAMPLE_SEED + 1_000_003 * cfg.seed  # every seed samples from its own noise
        cfg.init_seed = resolved_init_seed(cfg)  # once, here, so config.json records where the weights came from
        # `{run_name}` in --output_dir gives every run of a sweep its own folder
        cfg.output_dir = cfg.output_dir.replace("{run_name}", self.run_name)
        self.out = Path(cfg.output_dir)
        self.accelerator = build_accelerator(cfg)
        check_device(self.spec, self.accelerator.device)
        if cfg.enable_xformers_memory_efficient_attention:
            logger.warning("--enable_xformers_memory_efficient_attention: not needed, attention already runs on "
                           "PyTorch's scaled_dot_product_attention (memory-efficient and flash kernels); "
                           "xformers is not used", main_process_only=True)
        # decided on the main process, the others wait for its verdict (checks run by every process raced)
        self.resume_path = decided_on_main(self.accelerator, lambda: check_output_dir(cfg, self.out))
        self.config_changes = self.check_same_experiment()  # before the data scan: a refusal takes a second
        # before the data scan, which can take minutes on a large folder
        self.repo_id = decided_on_main(self.accelerator, lambda: check_hub(cfg))
        if cfg.torch_compile:
            share_compile_cache()  # first: inductor pins its /tmp default the first time it looks the folder up
            check_compiler(self.accelerator.device)
        configure_backends(cfg.allow_tf32)
        self.data = build_datasets(cfg, self.channels)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
        self.num_workers = num_loader_workers(cfg.dataloader_num_workers, self.data.in_memory, per_node)
        self.model = to_channels_last(build_unet(cfg.model_preset, cfg.resolution, self.channels, cfg.init_seed,
                                                 cfg.model_config_name_or_path), cfg.channels_last)
        self.noise_scheduler = build_noise_scheduler(cfg.ddpm_num_steps, cfg.ddpm_beta_schedule, cfg.prediction_type)
        self.optimizer = build(self.resolved, self.model, self.accelerator.device)
        self.routing_keys = routing_keys(self.model, self.spec.param_routing)  # to log each routed group's lr
        self.max_steps = num_train_steps(cfg, len(self.data.train), self.accelerator.num_processes)
        self.save_model_steps = resolve_epoch_cadences(cfg, len(self.data.train), self.accelerator.num_processes)
        # resolved once, here, and recorded in config.json as used
        cfg.lr_scheduler = resolve_lr_scheduler(cfg.lr_scheduler, self.spec.schedule_free)
        if cfg.lr_warmup_steps is None:
            cfg.lr_warmup_steps = default_warmup_steps(self.max_steps)
        self.global_batch_size = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        self.lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, cfg.lr_warmup_steps,
                                               self.max_steps, cfg.lr_num_cycles)
        self.ema = build_ema(cfg, self.model)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # Listed once: model.parameters() walks every submodule (~0.5 ms a walk on the tiny UNet, up to three
        # walks a step), and the prepared model's parameters stay the same tensors (resume loads in place).
        self.params = list(self.model.parameters())
        # only the training forward is compiled; everything else calls self.model (see speed.compile_for_training)
        self.train_forward = compile_for_training(self.model, cfg.compile_mode) if cfg.torch_compile else self.model
        self.compile_s: float | None = None  # logged once, as perf/compile_s, with the first log step
        if self.spec.needs_train_eval:  # schedule-free starts in eval mode and refuses to step until told
            self.optimizer.train()
        # The LR schedule is stepped by hand once per optimizer step (prepare() would step it once per process).
        register_json_state(self.accelerator, "lr_scheduler.json", self.lr_scheduler)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
            register_ema_hooks(self.accelerator, self.ema)
        self.train_metrics = TrainMetrics(cfg.num_timestep_buckets, cfg.ddpm_num_steps, cfg.max_grad_norm,
                                          self.accelerator.device)
        self.metrics = MetricsLog(self.accelerator, self.out, self.trackers)
        self.quality = build_quality(cfg, self.data)
        self.check_validation_set()
        # status.json for onlookers (a comparison's live view); written from start(), after every check passed
        self.status = RunStatus(self.out, self.run_name, self.max_steps, self.accelerator.is_main_process)
        self.probe = build_probe(cfg, self.data.validation, self.accelerator, self.model, self.noise_scheduler)
        self.probe_record: dict[str, float] = {}
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.elapsed_before = 0.0
        self.update_ratio: float | None = None  # of the last log step
        self.saved_step = -1
        self.stop_request = StopRequest(self.accelerator)  # all processes build it: it may create a group
        self.warned_slow_save = False  # once per run: see distributed.slow_save_warning
        self.failed_loads = 0  # images that failed to load during training, all ranks, as of the last log step
        self._reset_interval()

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to max_train_steps (resuming if asked) and save the pipeline; returns the run summary.

        A signal during start-up or training stops after the step in progress; during the final save it is
        noted and the run completes (a second signal exits at once either way)."""
        # The main process holds the run folder's lock while it writes there: a second trainer is refused (on
        # every process: they share the main one's verdict).
        lock = rundir.RunLock(self.out)
        decided_on_main(self.accelerator, lambda: bool(lock.acquire()))
        try:
            if decided_on_main(self.accelerator, self.already_complete):
                return self.leave_complete_run()
            return self._train()
        finally:
            lock.release()

    def already_complete(self) -> bool:
        """Resuming a complete run at its last step (e.g. a job script's `--resume_from_checkpoint latest` run
        again): there is nothing to train."""
        if self.resume_path is None or not rundir.is_complete(self.out) or self.changed_on_resume:
            return False  # a change allowed by --allow_config_change is loaded and checked like any resume
        return ckpt.read_trainer_state(self.resume_path).get("step", -1) >= self.max_steps

    def leave_complete_run(self) -> dict[str, Any]:
        """Nothing is loaded, rewritten or logged again: the run's files stay byte-identical. With --push_to_hub
        the finished run is uploaded as it is (a push that failed at the end, retried by the same command); only
        the model card README.md is written, and only when it is missing or differs."""
        summary = rundir.read_json(self.out / rundir.SUMMARY)
        logger.info(f"{self.out} is already complete ({summary.get('steps')} steps): nothing to train, its files "
                    "are left as they are", main_process_only=True)
        if self.repo_id and self.accelerator.is_main_process:
            self.publish()
        self.step = int(summary.get("steps") or self.max_steps)
        self.accelerator.end_training()
        return summary

    def _train(self) -> dict[str, Any]:
        with self.stop_request.listening():
            self.start()
            if self.cfg.torch_compile:
                self.compile_s = self.warm_up_compile()
                self.t_interval_start = time.perf_counter()  # images/s counts training steps only
            self.status.start_training(self.step)
            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.run_name, dynamic_ncols=True,
                       disable=not self.accelerator.is_local_main_process)
            batches = iter(self.build_loader())
            try:
                stop = self.run_loop(batches, bar)
            finally:  # as soon as the loop ends, before a checkpoint or the final save, and on any error
                close_data_workers(batches)
            if stop is not None:
                return self.stop_early(stop, bar)
            bar.close()
            return self.finish()

    def run_loop(self, batches, bar) -> Stop | None:
        """Steps until the run is done (None) or every process agreed to stop (the Stop)."""
        self.t_start = time.perf_counter()
        while self.step < self.max_steps:
            stop = self.run_step(batches, bar)
            if stop is None and self.step == self.cfg.stop_after_steps and self.step < self.max_steps:
                stop = Stop()
            if stop is not None:
                return stop
        return None

    def run_step(self, batches, bar) -> Stop | None:
        """One whole step of the loop: train, count it, its logging/validation/samples/checkpoint work, then the
        stop decision every process agrees on (a signal or a diverged run on any of them)."""
        self.train_step(batches)
        self.step += 1
        bar.update(1)
        self.after_step(bar)
        stop = self.stop_request.agreed(diverged=self.nonfinite_streak >= self.cfg.max_nonfinite_steps)
        if stop is None and self.too_many_bad_images():  # the count is already the same on every process
            stop = Stop(bad_images=True)
        return stop

    def train_step(self, batches) -> None:
        """One optimizer step: gradient_accumulation_steps micro-batches, clip, step (unless non-finite)."""
        is_log_step = self.is_log_step(self.step + 1)  # the step about to run
        is_probe_step = self.probe is not None and self._due(self.cfg.grad_probe_steps, self.step + 1)
        if is_probe_step:  # at the weights the step starts from, before its gradients exist
            self.probe.measure_before_step(first_moment_buffers(
                self.optimizer.optimizer, self.probe.params, self.spec.first_moment_state))
        for micro in range(self.cfg.gradient_accumulation_steps):
            with self.accelerator.accumulate(self.model):
                self.forward_backward(next(batches), micro)
        grad_norm = self.clip_gradients()
        snapshot = UpdateSnapshot(self.params) if is_log_step or is_probe_step else None
        self.optimizer_step(grad_norm)
        if snapshot is not None:
            delta_sq, before_sq = snapshot.sums_of_squares()
            self.update_ratio = float(delta_sq.sqrt() / before_sq.sqrt().clamp_min(1e-12))
            if is_probe_step:  # the training gradients are freed by now: the probe's peak stays one copy
                self.probe_record = self.probe.measure_after_step(snapshot.before, delta_sq)

    def forward_backward(self, clean: torch.Tensor, micro: int) -> None:
        """Noise a micro-batch, predict, and backpropagate the (optionally Min-SNR weighted) per-sample MSE."""
        clean = clean.to(self.accelerator.device, non_blocking=True)
        noise, timesteps = self.micro_batch_noise(clean, micro)
        mse, loss = self.compute_loss(clean, noise, timesteps)
        self.accelerator.backward(loss)
        self.train_metrics.add_micro_batch(mse, timesteps, loss)

    def compute_loss(self, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample MSE of the prediction and the (optionally Min-SNR weighted) loss to backpropagate."""
        noisy = channels_last_input(self.noise_scheduler.add_noise(clean, noise, timesteps), self.cfg.channels_last)
        if self.cfg.torch_compile:
            mark_step_begin(self.cfg.compile_mode, self.accelerator.device)
        pred = self.train_forward(noisy, timesteps).sample
        mse = per_sample_mse(pred, training_target(self.noise_scheduler, clean, noise, timesteps))
        weights = min_snr_weights(self.noise_scheduler, timesteps, self.cfg.snr_gamma) if self.cfg.snr_gamma else None
        return mse, (mse * weights).mean() if weights is not None else mse.mean()

    def micro_batch_noise(self, clean: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps of this rank's samples, drawn on the device from (seed, step, micro, global index)."""
        b = clean.shape[0]
        return micro_batch_noise(self.cfg.seed, self.step, micro, self.accelerator.process_index * b, b,
                                 tuple(clean.shape[1:]), self.cfg.ddpm_num_steps, clean.device, clean.dtype)

    def warm_up_compile(self) -> float:
        """Compile the training forward and backward on a batch of the training shape; returns the seconds taken.

        Before step 1, so the compile is in no step's time nor in perf/images_per_sec. It changes nothing:
        no optimizer step, the gradients it leaves are zeroed, and the RNG is restored (speed.warm_up_compiled).
        """
        cfg, device = self.cfg, self.accelerator.device
        shape = (cfg.train_batch_size, self.channels, cfg.resolution, cfg.resolution)

        def forward_backward() -> None:
            clean = torch.zeros(shape, device=device)
            timesteps = torch.zeros(shape[0], dtype=torch.long, device=device)
            _, loss = self.compute_loss(clean, torch.randn_like(clean), timesteps)
            self.accelerator.backward(loss)

        with self.status.phase("compiling", f"torch.compile mode {cfg.compile_mode}, cached for later runs"):
            seconds = warm_up_compiled(forward_backward)
        self.optimizer.zero_grad(set_to_none=True)
        return seconds

    def clip_gradients(self) -> torch.Tensor:
        """Global gradient norm before clipping (clipping only when gradients are synchronized)."""
        params = [p for p in self.params if p.grad is not None]
        if self.cfg.max_grad_norm > 0 and self.accelerator.sync_gradients:
            norm = self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            if self.accelerator.scaler is not None:
                self.accelerator.unscale_gradients()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.as_tensor(norm, device=self.accelerator.device).float()

    def optimizer_step(self, grad_norm: torch.Tensor) -> None:
        """Step unless the gradients are not finite: a bad step changes no weights and no optimizer state."""
        skipped = False
        if self.accelerator.scaler is not None:  # fp16: the grad scaler decides and skips by itself
            self.optimizer.step()
            skipped = self.optimizer.step_was_skipped
        elif torch.isfinite(grad_norm):  # note: a host sync point, the one per step we accept for safety
            self.optimizer.step()
        else:
            skipped = True
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if skipped:
            self.nonfinite_total += 1
            # fp16 loss scaling skips a few steps by design while it calibrates; only a non-finite loss
            # (not just overflowing fp16 gradients) counts towards stopping the run
            if self.accelerator.scaler is None or not torch.isfinite(self.train_metrics.step_loss):
                self.nonfinite_streak += 1
            self.train_metrics.discard_step()
        else:
            self.nonfinite_streak = 0
            self.train_metrics.apply_step(grad_norm)
            if self.ema is not None:
                self.ema.step(self.params)

    def bad_image_limit(self) -> int | None:
        """--max_bad_images; by default 0, or no limit with --skip_bad_images."""
        if self.cfg.max_bad_images is not None:
            return self.cfg.max_bad_images
        return None if self.cfg.skip_bad_images else 0

    def too_many_bad_images(self) -> bool:
        """More images failed to load during training (all processes, as of the last log step) than allowed."""
        limit = self.bad_image_limit()
        return limit is not None and self.failed_loads > limit

    def stop_early(self, stop: Stop, bar) -> dict[str, Any]:
        """Every process, after the same complete step: one checkpoint (its label matches its weights), then out."""
        bar.close()  # so the line that follows starts on its own line
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.accelerator.end_training()
        self.status.update(step=self.step, phase="diverged" if stop.diverged else "interrupted" if stop.signum
                           else "stopped")
        if stop.bad_images:
            raise TrainingStopped(
                f"{self.failed_loads} images failed to load during training (more than --max_bad_images "
                f"{self.bad_image_limit()}); the warnings above name them. A checkpoint was saved; fix or remove "
                "them, or pass --skip_bad_images or a larger --max_bad_images, and resume.")
        if stop.diverged:
            raise TrainingStopped(
                f"{self.cfg.max_nonfinite_steps} non-finite steps in a row at step {self.step}: the run diverged. "
                f"A checkpoint was saved; lower --learning_rate or set --max_grad_norm and resume.")
        if stop.signum:
            return {"status": "interrupted", "signal": stop.signal_name, "steps": self.step}
        logger.info(f"stopped after step {self.step} (--stop_after_steps); resume with "
                    "--resume_from_checkpoint latest", main_process_only=True)
        return {"status": "stopped", "steps": self.step}

    def after_step(self, bar) -> None:
        """Logging, validation, samples, quality metrics and checkpoints, each on its own interval."""
        record: dict[str, Any] = {}
        last = self.step == self.max_steps
        log_step = self.is_log_step(self.step)
        if log_step:
            record.update(self.reduce_interval())
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}",
                            img_s=f"{record['perf/images_per_sec']:.0f}")
            self.status.update(step=self.step, loss=record["train/loss"], lr=record["train/lr"],
                               images_per_sec=record["perf/images_per_sec"])
        if self.probe_record:
            record.update(self.probe_record)
            self.probe_record = {}
        if self._due(self.cfg.validation_steps) or last:
            record.update(self.validate())
        if self._due(self.cfg.eval_steps) or (last and self.quality is not None):
            record.update(self.evaluate_quality())
        if record:
            record["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.t_start
            record["train/images_seen"] = self.step * self.global_batch_size
            self.metrics.log(record, self.step)
        if self._due(self.cfg.sample_steps) or last:
            self.sample_grid()
        if self._due(self.save_model_steps) and not last:  # diffusers' --save_model_epochs; the end saves anyway
            self.save_model()
        if self._due(self.cfg.checkpointing_steps):  # the last step too: a longer run can resume from it
            self.save_checkpoint()
        if log_step:  # throughput counts training only, not the validation/sampling just done
            self.t_interval_start = time.perf_counter()

    # ---- metrics ---------------------------------------------------------------------------------------
    def reduce_interval(self) -> dict[str, float]:
        """The interval's training metrics (one collective, one host copy) plus perf, optimizer and weights."""
        acc = self.accelerator
        record = self.train_metrics.reduce(lambda t: acc.reduce(t, reduction="sum"), acc.num_processes)
        seconds = max(time.perf_counter() - self.t_interval_start, 1e-9)
        steps = self.step - self.train_metrics.first_step
        images = steps * self.global_batch_size
        record.update({
            **group_lrs(self.optimizer.param_groups, self.lr_scheduler.get_last_lr(), self.hparams["lr"],
                        self.routing_keys),
            "train/nonfinite_steps": self.nonfinite_total,
            "perf/images_per_sec": images / seconds,
            **({"perf/compile_s": self.compile_s} if self.compile_s is not None else {}),
            **peak_memory(acc.device),
            **self._state_size(),
            "train/param_norm": param_norm(self.params),
        })
        if self.update_ratio is not None:
            record["train/update_ratio"] = self.update_ratio
        if not self.data.in_memory:  # same on every rank, so every rank joins this small collective
            failed = torch.tensor(float(num_failed_loads(self.data.train)), device=acc.device)
            record["data/skipped_images"] = self.data.num_skipped + int(acc.reduce(failed, reduction="sum").item())
            self.failed_loads = record["data/skipped_images"] - self.data.num_skipped
        effective = self.spec.effective_lr(self.optimizer.optimizer)
        if effective is None and not self.spec.lr_is_multiplier:
            effective = record["train/lr"]  # the step size actually applied, under one key for every optimizer
        if effective is not None:
            record["train/effective_lr"] = float(effective)
        self.compile_s = None  # once per process: a resumed run logs its own compile
        self._reset_interval()
        return record

    def _state_size(self) -> dict[str, float]:
        """Optimizer state in MB and in bytes per trained parameter (8 for Adam in fp32, 0 for plain SGD)."""
        optimizer = self.optimizer.optimizer
        state = optimizer_state_bytes(optimizer)
        trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        return {"optim/state_mb": state / 2**20, "optim/state_bytes_per_param": state / max(trained, 1)}

    def _reset_interval(self) -> None:
        self.train_metrics.reset_interval(first_step=self.step)
        self.update_ratio = None
        self.t_interval_start = time.perf_counter()

    def validate(self) -> dict[str, float]:
        """val/* of the weights that sample (EMA when on); with EMA also val_raw/* of the raw weights."""
        if len(self.data.validation) == 0:
            return {}
        with self.sampling_weights() as unet:
            record = self.validation_loss(unet)
        if self.ema is not None:
            with self.eval_mode():
                raw = self.validation_loss(self.accelerator.unwrap_model(self.model))
            record.update({raw_key(k): v for k, v in raw.items()})
        return record

    @torch.no_grad()
    def validation_loss(self, unet) -> dict[str, float]:
        """Loss and its standard error per timestep bucket over every frozen draw of the held-out images."""
        cfg, acc = self.cfg, self.accelerator
        meter = ValidationMeter(cfg.num_timestep_buckets, cfg.ddpm_num_steps, acc.device)
        for x, n, t in validation_batches(self.data.validation, cfg.num_validation_draws, cfg.ddpm_num_steps,
                                          cfg.num_timestep_buckets, acc.process_index, acc.num_processes,
                                          cfg.train_batch_size):
            x, n, t = x.to(acc.device), n.to(acc.device, x.dtype), t.to(acc.device)
            with acc.autocast():
                pred = unet(self.noise_scheduler.add_noise(x, n, t), t).sample
            meter.update(per_sample_mse(pred, training_target(self.noise_scheduler, x, n, t)), t)
        return validation_record(acc.reduce(meter.state(), reduction="sum"), cfg.ddpm_num_steps)

    def check_validation_set(self) -> None:
        """A validation set too small for the timestep buckets fails before training, not at the first validation."""
        if self.cfg.num_validation_draws < 1:
            raise UserError(f"--num_validation_draws must be at least 1, got {self.cfg.num_validation_draws}")
        if len(self.data.validation):
            validation_draw(self.data.validation.shape, 0, self.cfg.ddpm_num_steps, self.cfg.num_timestep_buckets)

    def evaluate_quality(self) -> dict[str, float]:
        """eval/* of the sampling weights, eval_raw/* of the raw ones when EMA is on, and eval_floor/*.

        Every process generates its share of the samples; the main process scores the gathered set (identical
        to one process's), while the others wait only for that scoring."""
        if self.quality is None:
            return {}
        result: dict[str, float] = {}
        detail = f"{self.cfg.num_eval_samples} samples x {self.cfg.num_inference_steps} DDPM steps"
        with self.status.phase("quality evaluation", detail, self.step):
            with self.sampling_weights() as unet:
                samples = self.eval_samples(unet)
            raw = None
            if self.ema is not None:
                with self.eval_mode():
                    raw = self.eval_samples(self.accelerator.unwrap_model(self.model))
            if self.accelerator.is_main_process:
                result = self.quality.evaluate(samples)
                if raw is not None:
                    result.update({raw_key(k): v for k, v in self.quality.evaluate(raw).items()})
                result.update(self.quality.floor(self.cfg.num_eval_samples))
        self.accelerator.wait_for_everyone()
        return result

    def save_model(self) -> None:
        """The pipeline with the current (EMA) weights in --output_dir, as diffusers' --save_model_epochs does."""
        if self.accelerator.is_main_process:
            with self.sampling_weights() as unet:
                save_pipeline(unet, self.noise_scheduler, self.out)
        self.accelerator.wait_for_everyone()

    def eval_samples(self, unet) -> torch.Tensor | None:
        """num_eval_samples samples from the seed's own sampling noise (the same for EMA and raw weights); every
        process generates its share, the main process gets them all (None elsewhere)."""
        return generate_images(unet, self.noise_scheduler, self.cfg.num_eval_samples, self.sample_seed + 1,
                               self.cfg.num_inference_steps, self.accelerator, self.cfg.sample_batch_size)

    def sample_grid(self) -> None:
        """The fixed-seed sample grid (EMA weights when EMA is on), generated by every process, saved as PNG and
        sent to the trackers by the main one."""
        name = "final sampling" if self.step == self.max_steps else "sampling"
        detail = f"{self.cfg.num_samples} images x {self.cfg.num_inference_steps} DDPM steps"
        with self.status.phase(name, detail, self.step), self.sampling_weights() as unet:
            samples = generate_images(unet, self.noise_scheduler, self.cfg.num_samples, self.sample_seed,
                                      self.cfg.num_inference_steps, self.accelerator, self.cfg.sample_batch_size)
        if self.accelerator.is_main_process:
            grid = images_to_grid(samples)
            path = self.out / "samples" / f"step_{self.step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            self.metrics.log_image("samples/grid", grid, self.step, caption=f"{self.run_name} step {self.step}")
        self.accelerator.wait_for_everyone()

    # ---- modes, weights, checkpoints ----------------------------------------------------------------
    @contextlib.contextmanager
    def eval_mode(self):
        """model.eval(), and optimizer.eval() for optimizers whose spec demands it (schedule-free)."""
        self.model.eval()
        if self.spec.needs_train_eval:
            self.optimizer.eval()  # AcceleratedOptimizer.eval() reaches through DeepSpeed's wrapper too
        try:
            yield
        finally:
            self.model.train()
            if self.spec.needs_train_eval:
                self.optimizer.train()

    @contextlib.contextmanager
    def sampling_weights(self):
        """The unwrapped UNet in eval mode, with EMA weights swapped in when EMA is on."""
        with self.eval_mode():
            unet = self.accelerator.unwrap_model(self.model)
            if self.ema is not None:
                self.ema.store(unet.parameters())
                self.ema.copy_to(unet.parameters())
            try:
                yield unet
            finally:
                if self.ema is not None:
                    self.ema.restore(unet.parameters())

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "run_name": self.run_name,
                 "elapsed_s": self.elapsed_before + time.perf_counter() - getattr(self, "t_start", time.perf_counter()),
                 # the experiment this checkpoint belongs to, so a resume can refuse a different one
                 "config": self.cfg.to_dict(), "optimizer": optimizer_record(self.spec, self.hparams),
                 "config_changes": self.config_changes,
                 # with train_batch_size and gradient_accumulation_steps: the global batch a resume must keep
                 "num_processes": self.accelerator.num_processes}
        # Saved in train mode: a schedule-free optimizer's eval()/train() swap is exact in maths but not in floats,
        # so a checkpoint of the evaluation weights would not resume bit-for-bit. Samples and the final pipeline
        # use the evaluation weights (sampling_weights).
        where = self.out / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(self.step)
        started = time.perf_counter()
        with self.status.phase("checkpoint writing", str(where), self.step):
            ckpt.save_checkpoint(self.accelerator, self.out, self.step, state, self.cfg.checkpoints_total_limit,
                                 model_config=dict(self.accelerator.unwrap_model(self.model).config))
        warning = None if self.warned_slow_save else slow_save_warning(time.perf_counter() - started,
                                                                           self.stop_request.launcher)
        if warning:
            logger.warning(warning, main_process_only=True)
            self.warned_slow_save = True
        self.saved_step = self.step
        if self.accelerator.is_main_process:
            rundir.drop_replaced(self.out)  # the new run (or rewound timeline) now has something to resume from

    def check_same_experiment(self) -> list[dict[str, Any]]:
        """Resume refuses a different experiment (each changed flag named) unless --allow_config_change records it."""
        self.changed_on_resume = False
        if self.resume_path is None:
            return []
        state = ckpt.read_trainer_state(self.resume_path)
        history = list(state.get("config_changes", []))
        layouts = resumed_layouts(state, self.cfg, self.accelerator.num_processes)
        changes = experiment_changes(state, self.cfg, self.spec, self.hparams, layouts)
        self.changed_on_resume = bool(changes)
        if not changes:
            if layouts is not None:
                logger.info(f"resuming at step {state.get('step')} on global batch {layouts[1]}, checkpointed on "
                            f"{layouts[0]}: the same images, noise and timesteps; gradients are summed in another "
                            "order, so the run matches one never moved to float rounding, not bit for bit",
                            main_process_only=True)
            return history
        if not self.cfg.allow_config_change:
            raise self.refusal(changes, layouts)
        logger.warning(f"--allow_config_change: resuming at step {state.get('step')} with {listed(changes)}",
                       main_process_only=True)
        return [*history, {"step": state.get("step"), "changes": {k: list(v) for k, v in changes.items()}}]

    def refusal(self, changes: dict[str, tuple], layouts: tuple[BatchLayout, BatchLayout] | None) -> UserError:
        """The one line refusing another experiment; every process refuses, the main one prints it."""
        if layouts is not None and not layouts[0].same_experiment(layouts[1]):
            others = {k: v for k, v in changes.items() if k not in LAYOUT_KEYS}
            also = f" (also changed: {listed(others)})" if others else ""
            message = (f"{self.resume_path}: {layout_refusal(*layouts)}{also}, or pass --allow_config_change to "
                       "apply and record the change")
        else:
            message = (f"{self.resume_path} belongs to a different experiment (changed: {listed(changes)}); resume "
                       "with its flags, use a new --output_dir, or pass --allow_config_change to apply and record this")
        error = UserError(message)
        error.quiet = not self.accelerator.is_main_process
        return error

    def start(self) -> None:
        """Resume or set aside an old run (only now, every check passed), write the run config, start trackers."""
        cfg, acc = self.cfg, self.accelerator
        if self.resume_path is not None:
            self.resume()
        elif acc.is_main_process and cfg.overwrite_output_dir:
            rundir.move_aside(self.out)
        elif acc.is_main_process:
            clear_previous_run(self.out)
        run_config = self.run_config()
        if acc.is_main_process:
            rundir.write_json(self.out / rundir.CONFIG, run_config)
        acc.wait_for_everyone()  # no process goes on while the main one is still setting the old run aside
        tags = [self.spec.name, cfg.model_preset, self.data.name, cfg.prediction_type]
        with redacted_sys_argv():  # W&B saves the command line in its run metadata
            init_trackers(acc, self.trackers, cfg.tracker_project_name, self.out, self.tracker_config(run_config),
                          self.run_name, cfg.run_group, tags, cfg.wandb_entity)
        self._reset_interval()

    def resume(self) -> None:
        """Load the checkpoint (nothing is written before it loaded), apply allowed changes, cut metrics back."""
        acc = self.accelerator
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = ckpt.load_checkpoint(acc, self.resume_path, dict(acc.unwrap_model(self.model).config))
        if self.spec.needs_train_eval:  # a checkpoint saved in eval mode (older versions) resumes too
            self.optimizer.train()
        self.step, self.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        if self.config_changes and self.config_changes[-1].get("step") == self.step:
            self.apply_config_change(state, fresh)
        if acc.is_main_process:  # a resume at an older step than the folder's newest sets the later timeline aside
            rundir.rewind(self.out, self.step, ckpt.newer_checkpoints(self.out, self.step))
            rundir.truncate_metrics(self.out / rundir.METRICS, self.step)
        logger.info(f"resumed from {self.resume_path} at step {self.step}", main_process_only=True)

    def apply_config_change(self, state: dict[str, Any], fresh: list[dict[str, Any]]) -> None:
        """--allow_config_change: the new optimizer settings replace the loaded ones (load_state restored the old)."""
        saved = state.get("optimizer") or {}
        if saved.get("name") not in (None, self.spec.name):
            self.optimizer.optimizer.state.clear()  # another optimizer's moments mean nothing to this one
        # hyperparameters are the constructor's arguments; other group keys are running state (schedule-free's k)
        hyper = set(inspect.signature(type(self.optimizer.optimizer).__init__).parameters) | {"initial_lr"}
        for group, new in zip(self.optimizer.param_groups, fresh):
            group.update({k: v for k, v in new.items() if k in hyper})
        sched = self.lr_scheduler
        sched.base_lrs = [g["initial_lr"] for g in fresh]
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.ema is not None and not (self.resume_path / "unet_ema").is_dir():  # EMA turned on now: start it here
            self.ema = build_ema(self.cfg, self.accelerator.unwrap_model(self.model))
            self.ema.to(self.accelerator.device)

    def tracker_config(self, run_config: dict[str, Any]) -> dict[str, Any]:
        """Flags at the top level (W&B panels group by `optimizer`, `learning_rate`...), the rest nested."""
        flags = {**run_config["config"], "optimizer": self.spec.name, "learning_rate": self.resolved.lr}
        rest = {k: v for k, v in run_config.items() if k not in ("config", "optimizer")}
        return {**flags, "optimizer_spec": run_config["optimizer"], **rest}

    def run_config(self) -> dict[str, Any]:
        """Everything needed to reproduce and compare the run (no secrets)."""
        return {
            "config": self.cfg.to_dict(),
            "optimizer": optimizer_record(self.spec, self.hparams),
            "run_name": self.run_name,
            "dataset": self.data.name,
            "num_skipped_images": self.data.num_skipped,
            "dataloader_num_workers": self.num_workers,
            "num_processes": self.accelerator.num_processes,
            "max_train_steps": self.max_steps,
            "num_parameters": sum(p.numel() for p in self.params),
            "mixed_precision": self.accelerator.mixed_precision,
            "versions": package_versions(),
            "command": " ".join([os.path.basename(sys.argv[0]), *redact_argv(sys.argv[1:])]),
            "config_changes": self.config_changes,
        }

    def build_loader(self) -> torch.utils.data.DataLoader:
        """Batches of this process's share of each global micro-batch, starting at the resumed position."""
        acc, cfg = self.accelerator, self.cfg
        stream = BatchStream(len(self.data.train), cfg.train_batch_size, acc.num_processes, acc.process_index,
                             cfg.seed, start=self.step * cfg.gradient_accumulation_steps)
        workers = self.num_workers
        return torch.utils.data.DataLoader(self.data.train, batch_sampler=stream, num_workers=workers,
                                           persistent_workers=workers > 0, pin_memory=acc.device.type == "cuda",
                                           worker_init_fn=shelter_data_worker if workers > 0 else None)

    def finish(self) -> dict[str, Any]:
        """Save the final pipeline, write run_summary.json last, and upload if asked."""
        acc = self.accelerator
        acc.wait_for_everyone()
        summary: dict[str, Any] = {}
        if acc.is_main_process:
            with self.status.phase("pipeline writing", f"DDPMPipeline in {self.out}"), self.sampling_weights() as unet:
                save_pipeline(unet, self.noise_scheduler, self.out)
            summary = write_summary(self.out, self.step, self.elapsed_before + time.perf_counter() - self.t_start,
                                    self.nonfinite_total)
            rundir.drop_replaced(self.out)
            if self.repo_id:
                with self.status.phase("Hub upload", f"{self.out} to {self.repo_id}"):
                    self.publish()
            self.status.update(phase="done")
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def publish(self) -> None:
        """Upload the finished run (card from its own files, as `diffusers-optim push` does later)."""
        from diffusers_optim import hub

        url = hub.publish_run(self.out, self.repo_id, self.cfg.hub_token, self.cfg.hub_private_repo)
        logger.info(f"uploaded to {url}", main_process_only=True)

    def _due(self, every: int, step: int | None = None) -> bool:
        return every > 0 and (self.step if step is None else step) % every == 0

    def is_log_step(self, step: int) -> bool:
        """Metrics are reduced and logged every logging_steps and at the last step."""
        every = self.cfg.logging_steps
        return (every > 0 and step % every == 0) or step == self.max_steps


# ---- build helpers ---------------------------------------------------------------------------------------
def build_accelerator(cfg: TrainConfig) -> Accelerator:
    trackers = resolve_trackers(cfg.report_to)
    # --logging_dir is relative to --output_dir, as in diffusers (an absolute path stays as it is)
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir))
    # `accelerate launch` on a machine without CUDA does not pass use_cpu on to the workers: ask for CPU here so
    # several processes join one gloo group instead of training alone and writing the same folder.
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # The process group's timeout bounds how long a rank waits in a collective for the others (rank 0 alone
    # writing a checkpoint or a long evaluation); torch's default of 10-30 min is too short for big jobs.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    accelerator = Accelerator(
        cpu=distributed_cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_config=project,
        kwargs_handlers=[timeout],
    )
    set_seed(cfg.seed)
    return accelerator


def build_probe(cfg: TrainConfig, images: torch.Tensor, acc: Accelerator, model, noise_scheduler) -> GradProbe | None:
    """The gradient probes on the held-out images (None with --grad_probe_steps 0)."""
    if cfg.grad_probe_steps < 0:
        raise UserError(f"--grad_probe_steps must be 0 (off) or positive, got {cfg.grad_probe_steps}")
    if cfg.grad_probe_steps == 0 or len(images) == 0:
        return None
    # a fixed, bounded batch: the whole held-out split (400 digits) made one probe cost ~16 training steps
    batch = build_probe_batch(images[: cfg.grad_probe_images], cfg.ddpm_num_steps, cfg.num_timestep_buckets, PROBE_SEED,
                              acc.process_index, acc.num_processes, acc.device)
    reduce_sum = (lambda t: t) if acc.num_processes == 1 else (lambda t: acc.reduce(t, reduction="sum"))
    return GradProbe(acc.unwrap_model(model), noise_scheduler, batch, cfg.ddpm_num_steps, reduce_sum, acc.autocast)


def resolve_optimizer(cfg: TrainConfig, spec) -> ResolvedOptimizer:
    """Generic flags + --optimizer_args -> the registry's keyword arguments, validated (UserError if bad)."""
    extras = parse_optimizer_args(cfg.optimizer_args) if cfg.optimizer_args else {}
    betas = None
    if cfg.adam_beta1 is not None or cfg.adam_beta2 is not None:
        betas = (cfg.adam_beta1, cfg.adam_beta2)  # the registry fills a missing one with the optimizer's default
    generic = dict(lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay, betas=betas,
                   momentum=cfg.momentum, eps=cfg.adam_epsilon)
    for key in generic:
        if key in extras:
            if generic[key] is not None:
                raise UserError(f"'{key}' is given twice: as a flag and in --optimizer_args; keep one")
            generic[key] = extras.pop(key)
    generic = {k: v for k, v in generic.items() if v is not None}
    return resolve(spec, {**generic, **extras})


def build_ema(cfg: TrainConfig, model: torch.nn.Module):
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    # foreach: one torch._foreach_* kernel per update instead of a Python loop over every tensor
    return EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                    power=cfg.ema_power, model_cls=type(model), model_config=model.config, foreach=True)


def register_json_state(accelerator: Accelerator, filename: str, obj) -> None:
    """Checkpoint a small state_dict of plain values as JSON (accelerate would pickle it)."""
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            Path(output_dir, filename).write_text(json.dumps(obj.state_dict()))

    def load_hook(models, input_dir):
        obj.load_state_dict(json.loads(Path(input_dir, filename).read_text()))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def register_ema_hooks(accelerator: Accelerator, ema) -> None:
    """Save the EMA weights inside each checkpoint as a safetensors UNet (as diffusers' examples do), not a pickle."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_hook(models, input_dir):
        if not os.path.isdir(os.path.join(input_dir, "unet_ema")):
            return  # EMA turned on at this resume (--allow_config_change): the trainer starts it from the weights
        loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls=UNet2DModel)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def build_quality(cfg: TrainConfig, data):
    from diffusers_optim.metrics.quality import build_quality_metric

    return build_quality_metric(data.name, cfg.inception_weights, data.validation,
                                num_samples=cfg.num_eval_samples)


def steps_per_epoch(cfg: TrainConfig, num_images: int, num_processes: int) -> int:
    """Optimizer steps in one pass over the training images (the last batch may be partial)."""
    per_step = cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps
    return max(1, math.ceil(num_images / per_step))


def num_train_steps(cfg: TrainConfig, num_images: int, num_processes: int) -> int:
    """--max_train_steps, or --num_epochs converted to optimizer steps."""
    if cfg.num_epochs is None:
        return cfg.max_train_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch(cfg, num_images, num_processes)))


def resolve_epoch_cadences(cfg: TrainConfig, num_images: int, num_processes: int) -> int:
    """diffusers' epoch cadences as steps: --save_images_epochs sets sample_steps; returns the pipeline-save interval."""
    per_epoch = steps_per_epoch(cfg, num_images, num_processes)
    if cfg.save_images_epochs is not None:
        cfg.sample_steps = cfg.save_images_epochs * per_epoch
    return (cfg.save_model_epochs or 0) * per_epoch


def check_device(spec, device: torch.device) -> None:
    """An optimizer whose kernels need CUDA fails here, before the data scan, naming what it needs."""
    if spec.needs_cuda and device.type != "cuda":
        raise UserError(f"optimizer '{spec.name}' needs a CUDA GPU ({spec.description}); this run is on "
                        f"{device.type}. Pick another optimizer, e.g. adamw_8bit or adamw")


def check_hub(cfg: TrainConfig) -> str | None:
    """Fail in seconds, not after hours, when an upload at the end could not work."""
    if not cfg.push_to_hub:
        return None
    from diffusers_optim import hub

    return hub.check_hub_access(cfg)


def check_output_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Never clobber a previous run by accident; returns the checkpoint to resume from, if any."""
    resume = cfg.resume_from_checkpoint
    if resume == "latest" and not out.is_dir():  # before check_writable creates it: a typo must not go unnoticed
        raise UserError(f"--resume_from_checkpoint latest: {out} does not exist (a typo in --output_dir?); "
                        "use --resume_from_checkpoint auto to resume when there is a checkpoint, else start")
    check_writable(out)
    if rundir.lock_holder(out) is not None:  # checked on the main process only (decided_on_main)
        raise UserError(rundir.in_use_message(out))
    if resume:
        path = ckpt.find_checkpoint(out, "latest" if resume == "auto" else resume)
        if path is not None:
            return path
        if rundir.is_complete(out) and not cfg.overwrite_output_dir:
            raise UserError(finished_without_checkpoint(cfg, out))
        if resume == "latest":
            logger.warning(f"WARNING: --resume_from_checkpoint latest found no checkpoint in {out / 'checkpoints'}: "
                           "training starts from step 0", main_process_only=True)
        else:
            logger.info(f"no checkpoint in {out / 'checkpoints'} yet: starting a new run", main_process_only=True)
    existing = rundir.existing_run(out)
    if existing and not cfg.overwrite_output_dir:
        hint = ("it has no complete checkpoint to resume from; pass --overwrite_output_dir to replace it"
                if cfg.resume_from_checkpoint else
                "pass --resume_from_checkpoint latest to continue it or --overwrite_output_dir to replace it")
        raise UserError(f"output directory {out} already holds a run ({', '.join(existing)}); {hint}")
    return None


def finished_without_checkpoint(cfg: TrainConfig, out: Path) -> str:
    """A finished run saved no checkpoint (--checkpointing_steps 0): there is nothing to resume; say what can be done."""
    from diffusers_optim.hub import push_command

    steps = rundir.read_json(out / rundir.SUMMARY).get("steps")
    return (f"{out} is a finished run ({steps} steps) with no checkpoint to continue from; publish it with: "
            f"{push_command(out, cfg.hub_model_id, cfg.hub_private_repo)}; or pass --overwrite_output_dir to train it "
            "again")


def clear_previous_run(out: Path) -> None:
    """A fresh start: remove the debris of a run killed before it logged anything (check_output_dir made sure)."""
    import shutil

    for name in (rundir.METRICS, rundir.SUMMARY, rundir.WANDB_ID):
        (out / name).unlink(missing_ok=True)
    for name in (rundir.CHECKPOINTS, rundir.SAMPLES):
        shutil.rmtree(out / name, ignore_errors=True)


def experiment_changes(state: dict[str, Any], cfg: TrainConfig, spec, hparams: dict[str, Any],
                       layouts: tuple[BatchLayout, BatchLayout] | None = None) -> dict[str, tuple]:
    """{what: (checkpoint's, now)} for every experiment-defining setting that differs from the checkpoint's.

    At another process count (`layouts`) the experiment is the global micro-batch, not --train_batch_size: 2
    processes x 4 continue as 1 process x 8. That continuation is exact in maths (the same images, noise,
    timesteps and a gradient averaged over the same samples) but not in floats (DDP's all-reduce and kernels run
    on other batch sizes sum in another order); it is the same experiment, as a run moved to another GPU is, so it
    continues rather than being refused. Any other layout is another experiment."""
    if "config" not in state:  # a checkpoint older than this check
        return {}
    changes = experiment_differences(state["config"], cfg.to_dict())
    if layouts is not None:  # the per-process batch is compared as part of the layout
        changes.pop("train_batch_size", None)
        changes.update(layout_changes(*layouts))
    saved = state.get("optimizer") or {}
    now = optimizer_record(spec, hparams)
    if saved.get("name") != now["name"]:
        changes["optimizer"] = (saved.get("name"), now["name"])
    old_h, new_h = json.loads(json.dumps(saved.get("hparams", {}))), json.loads(json.dumps(now["hparams"]))
    for key in sorted(set(old_h) | set(new_h)):
        if old_h.get(key) != new_h.get(key):
            changes[key] = (old_h.get(key), new_h.get(key))
    return changes


def listed(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())


def optimizer_record(spec, hparams: dict[str, Any]) -> dict[str, Any]:
    flags = {k: getattr(spec, k) for k in ("needs_train_eval", "lr_is_multiplier", "schedule_free", "needs_cuda",
                                           "fast_step")
             if hasattr(spec, k)}
    return {"name": spec.name, "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hparams.items()},
            "package": getattr(spec, "package", None), "flags": flags,
            "description": getattr(spec, "description", "")}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("diffusers-optim", "torch", "diffusers", "accelerate", "transformers", "wandb", "prodigyopt",
             "schedulefree", "lion-pytorch", "bitsandbytes", "pytorch-optimizer")
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory allocated on the GPU, or on CPU the whole process's peak resident memory, under its own key."""
    if device.type == "cuda":
        return {"perf/device_peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # on CPU, no allocator counts the model's tensors apart: name it for what it is, not "the optimizer's memory"
    return {"perf/process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def save_pipeline(unet, noise_scheduler, out: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config)).save_pretrained(out)


def write_summary(out: Path, steps: int, wall_time_s: float, nonfinite: int) -> dict[str, Any]:
    """run_summary.json, written last: its presence marks a complete run."""
    final: dict[str, Any] = {}
    for record in rundir.read_metrics(out / rundir.METRICS):
        final.update({k: v for k, v in record.items() if k != "step"})
    grids = sorted((out / "samples").glob("step_*.png"))
    summary = {"status": "complete", "steps": steps, "wall_time_s": wall_time_s, "nonfinite_steps": nonfinite,
               "final": final, "sample_grid": str(grids[-1].relative_to(out)) if grids else None}
    rundir.write_summary(out, summary)
    return summary


@contextlib.contextmanager
def redacted_sys_argv():
    """sys.argv without secret values while a tracker starts, so no token reaches its saved metadata."""
    saved = sys.argv
    sys.argv = [*saved[:1], *redact_argv(saved[1:])]
    try:
        yield
    finally:
        sys.argv = saved


def _is_digits(cfg: TrainConfig) -> bool:
    return not cfg.train_data_dir and cfg.dataset_name in (None, "digits")


def main(argv: list[str] | None = None) -> int:
    """`diffusers-optim train` and train_scripts/train_unconditional.py."""
    setup_console_logging()
    cfg = parse_train_args(argv)
    trainer = Trainer(cfg)
    main_process = trainer.accelerator.is_main_process
    try:
        summary = trainer.train()
    except TrainingStopped as err:
        error = UserError(str(err))
        error.quiet = not main_process  # every process stopped at the same step; one of them says so
        raise error from None
    if summary.get("status") == "interrupted":
        if main_process:
            print(f"interrupted ({summary['signal']}) after step {trainer.step}: checkpoint saved in {trainer.out}; "
                  "continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    if main_process and summary.get("status") == "complete":
        final = summary.get("final", {})
        print(f"done: {trainer.step} steps, val/loss {final.get('val/loss', float('nan')):.4f}, output in {trainer.out}")
    return 0
