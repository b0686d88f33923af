"""One typed config for a training run: defaults < --config file < command-line flags.

Flag names follow diffusers' `examples/unconditional_image_generation/train_unconditional.py`
wherever that script has one, so its users feel at home.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffusers_optim.errors import UserError, closest_match

REPORT_TO = ("wandb", "tensorboard", "all", "none")
SECRET_FIELDS = ("hub_token",)
# Flags that do not change the maths of a run (logging, cadence of samples/checkpoints, outputs, hub, session
# length): they may differ on resume. Every other flag defines the experiment, so a flag added later is compared
# by default; the optimizer flags are compared as the resolved optimizer and hyperparameters instead.
# Where and how a run is recorded, not what is trained (owned here; arms.NOT_ARM_KEYS and FREE_FIELDS build on it).
RECORD_FIELDS = (
    "output_dir", "overwrite_output_dir", "report_to", "logger", "tracker_project_name", "wandb_entity", "run_group",
    "run_name", "arm_name", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "push_to_hub",
    "hub_model_id", "hub_private_repo", "dataloader_num_workers", "cache_dir", "stop_after_steps", *SECRET_FIELDS,
)
# May change on resume without --allow_config_change: the record, the run's length and what is measured.
FREE_FIELDS = (
    *RECORD_FIELDS, "skip_bad_images", "max_bad_images", "ddp_timeout", "max_nonfinite_steps",
    # the run's length: extending a finished run on resume is common (diffusers' own resume test does it); the LR
    # schedule follows the new length and config.json records it
    "num_epochs", "max_train_steps",
    "num_timestep_buckets", "logging_steps", "validation_steps", "sample_steps", "eval_steps", "grad_probe_images",
    "num_samples", "num_eval_samples", "num_inference_steps", "sample_batch_size", "inception_weights",
    "allow_config_change", "local_rank", "save_images_epochs", "save_model_epochs", "logging_dir",
    "enable_xformers_memory_efficient_attention",
)
OPTIMIZER_FIELDS = ("optimizer", "optimizer_args", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay",
                    "adam_epsilon", "momentum")

# Flags users bring from diffusers' train_unconditional.py (or other trainers) that we name or count differently.
# Spelling alone gets these wrong (--save_images_epochs looks like --num_epochs), so the hint says what they mean.
# (Every flag of diffusers' train_unconditional.py is a real flag or an alias, so none of them needs a hint here.)
FLAG_MEANINGS = {
    "lr": "--learning_rate",
    "batch_size": "--train_batch_size (per process)",
    "epochs": "--num_epochs",
    "num_train_epochs": "--num_epochs",
    "steps": "--max_train_steps",
    "num_train_steps": "--max_train_steps",
    "optim": "--optimizer",
    "weight_decay": "--adam_weight_decay (applies to every optimizer that has weight decay)",
    "warmup_steps": "--lr_warmup_steps",
    "grad_clip": "--max_grad_norm",
    "clip_grad_norm": "--max_grad_norm",
    "save_steps": "--checkpointing_steps",
    "image_size": "--resolution",
    "ema": "--use_ema",
    "wandb": "--report_to wandb",
}


@dataclass
class TrainConfig:
    """Every setting of one training run. The docstring under each field is its --help text."""

    # ---- data -------------------------------------------------------------------------------
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set name or a local saved data set (datasets.load_from_disk / load_dataset). Default: the built-in 'digits'."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of the hub data set."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A folder of images (any depth). Give either this or --dataset_name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images in a datasets data set."})
    resolution: int = field(default=16, metadata={"help": "Images are resized to this square size."})
    center_crop: bool = field(default=False, metadata={"help": "Center-crop instead of random-crop to --resolution."})
    random_flip: bool = field(default=False, metadata={"help": "Randomly flip images horizontally."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    num_validation_images: int | None = field(default=None, metadata={"help": "Images held out for validation; default: the whole held-out split (400) on digits, 64 on other data."})
    num_validation_draws: int = field(default=2, metadata={"help": "Frozen noise/timestep draws per validation image (bucket-stratified, the same for every run): more draws, smaller val/loss_se, longer validation."})
    skip_bad_images: bool = field(default=False, metadata={"help": "Skip and count corrupt images instead of failing."})
    max_bad_images: int | None = field(default=None, metadata={"help": "Stop (with a checkpoint) once more images than this fail to load during training; default: 0, or no limit with --skip_bad_images."})
    ddp_timeout: int = field(default=7200, metadata={"help": "Seconds a process waits for the others in a collective before the job fails (diffusers' default, 7200)."})
    dataloader_num_workers: int | None = field(default=None, metadata={"help": "DataLoader worker processes that decode images; default: 0 for data held in memory (digits), else up to 8 per process by the cores available."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory for hub data sets."})
    preserve_input_precision: bool = field(default=False, metadata={"help": "Read 16-bit images at full precision instead of rounding them to 8 bits first."})

    # ---- model and diffusion ---------------------------------------------------------------
    model_preset: str = field(default="tiny", metadata={"help": "UNet2DModel size: tiny (CPU demo, tests), small, ddpm-cifar10, ddpm-256."})
    model_config_name_or_path: str | None = field(default=None, metadata={"help": "A UNet2DModel config: a folder, a JSON file or a Hub model id; overrides --model_preset."})
    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata={"help": "Accepted for diffusers compatibility: attention already runs on PyTorch's scaled_dot_product_attention (the same memory savings); a notice says so."})
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion timesteps of the DDPMScheduler."})
    ddpm_beta_schedule: str = field(default="linear", metadata={"help": "linear, scaled_linear or squaredcos_cap_v2."})
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = field(default="epsilon", metadata={"help": "What the UNet predicts."})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR loss weighting gamma (5.0 is the paper's choice). Off by default."})

    # ---- optimizer ----------------------------------------------------------------------------
    optimizer: str = field(default="adamw", metadata={"help": "Optimizer name from the registry (`diffusers-optim optimizers` lists them)."})
    optimizer_args: str | None = field(default=None, metadata={"help": "Extra optimizer hyperparameters, 'k=v,k2=v2'."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate; default: the optimizer's own (1e-4 for AdamW, 1.0 for Prodigy, whose lr is a multiplier)."})
    adam_beta1: float | None = field(default=None, metadata={"help": "beta1 (momentum); default: the optimizer's own."})
    adam_beta2: float | None = field(default=None, metadata={"help": "beta2; default: the optimizer's own."})
    adam_weight_decay: float | None = field(default=None, metadata={"help": "Weight decay (never on biases and norm weights); default: the optimizer's own."})
    adam_epsilon: float | None = field(default=None, metadata={"help": "eps; default: the optimizer's own."})
    momentum: float | None = field(default=None, metadata={"help": "Momentum for SGD/RMSProp-style optimizers; default: the optimizer's own."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 turns clipping off."})
    lr_scheduler: str | None = field(default=None, metadata={"help": "constant, linear, cosine (+ warmup), or any diffusers get_scheduler name; default: cosine, or constant for schedule-free optimizers (their authors use no decay)."})
    lr_warmup_steps: int | None = field(default=None, metadata={"help": "Linear warmup steps; default: 10% of the run, at most 50."})
    lr_num_cycles: float = field(default=0.5, metadata={"help": "Cosine cycles (0.5 = decay to zero once)."})

    # ---- loop ----------------------------------------------------------------------------------
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_train_steps: int = field(default=500, metadata={"help": "Optimizer steps to train."})
    stop_after_steps: int | None = field(default=None, metadata={"help": "End this session after step N with a checkpoint, schedule unchanged (time-limited jobs); continue with --resume_from_checkpoint latest."})
    num_epochs: int | None = field(default=None, metadata={"help": "If set, train this many epochs instead of --max_train_steps."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise, timesteps, sampling noise and (unless --fixed_init) the initial weights."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of the model's initial weights; default: --seed, or 0 with --fixed_init. Every optimizer with the same seed starts from the same weights."})
    fixed_init: bool = field(default=False, metadata={"help": "Start every seed from the same initial weights (--init_seed, default 0): seeds then vary data order, noise and sampling only."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={"help": "no, fp16 or bf16; default: the accelerate config's."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights (diffusers EMAModel); samples and the saved pipeline use it."})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warmup inv_gamma."})
    ema_power: float = field(default=3 / 4, metadata={"help": "EMA warmup power."})
    ema_max_decay: float = field(default=0.9999, metadata={"help": "EMA maximum decay."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Stop (with a checkpoint) after this many non-finite steps in a row."})

    # ---- speed: how fast a run computes, never what (results equal to float rounding) --------------
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the UNet for training (validation and sampling stay uncompiled, so nothing recompiles); the compile is paid once before step 1 (perf/compile_s) and cached for later runs. Pays on runs of a few hundred steps of the small preset and up; see README."})
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = field(default="default", metadata={"help": "torch.compile mode with --torch_compile; reduce-overhead and max-autotune add CUDA graphs on a GPU."})
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory layout for the UNet and its inputs (faster convolutions on GPU tensor cores)."})
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls and convolutions on Ampere or newer GPUs (faster, ~1e-3 relative precision)."})

    # ---- logging, validation, samples ----------------------------------------------------------
    output_dir: str = field(default="outputs/run", metadata={"help": "Where metrics, samples, checkpoints and the pipeline go; '{run_name}' is replaced by the run's name."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output directory that holds another run."})
    report_to: str = field(default="none", metadata={"help": "wandb, tensorboard, all or none (metrics.jsonl is always written)."})
    logger: str | None = field(default=None, metadata={"help": "Alias of --report_to (diffusers' flag name)."})
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard log folder, relative to --output_dir (as in diffusers)."})
    local_rank: int = field(default=-1, metadata={"help": "Accepted for diffusers compatibility; the launcher's LOCAL_RANK decides."})
    tracker_project_name: str = field(default="diffusers-optim", metadata={"help": "W&B / TensorBoard project name."})
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity (team or user)."})
    run_group: str | None = field(default=None, metadata={"help": "W&B group; all runs of one comparison share it."})
    run_name: str | None = field(default=None, metadata={"help": "Run name; default: optimizer-lr-seed."})
    arm_name: str | None = field(default=None, metadata={"help": "The comparison arm the run belongs to (set by `compare`; W&B groups a comparison's lines by it)."})
    num_timestep_buckets: int = field(default=4, metadata={"help": "Equal timestep ranges for loss_t/ and val_t/ (improved-diffusion's loss_q0..q3)."})
    logging_steps: int = field(default=10, metadata={"help": "Reduce and log metrics every N optimizer steps (0: only at the end)."})
    grad_probe_steps: int = field(default=200, metadata={"help": "Per-timestep gradient probes (grad_t/*) every N optimizer steps on a fixed probe batch (0: off)."})
    grad_probe_images: int = field(default=64, metadata={"help": "Images of the probe batch: the first N held-out images, timesteps stratified by bucket (a probe costs about 20 forward/backward passes over them)."})
    validation_steps: int = field(default=50, metadata={"help": "Validation loss every N steps (0: only at the end)."})
    sample_steps: int = field(default=250, metadata={"help": "Sample grid every N steps (0: only at the end)."})
    eval_steps: int = field(default=0, metadata={"help": "Sample-quality metrics every N steps (0: only at the end)."})
    num_samples: int = field(default=16, metadata={"aliases": ["--eval_batch_size"], "help": "Images in the sample grid (fixed-seed noise); --eval_batch_size is diffusers' name."})
    num_eval_samples: int = field(default=256, metadata={"help": "Samples drawn for the quality metrics."})
    num_inference_steps: int = field(default=100, metadata={"aliases": ["--ddpm_num_inference_steps"], "help": "DDPM sampling steps; --ddpm_num_inference_steps is diffusers' name."})
    sample_batch_size: int = field(default=32, metadata={"help": "Images each process generates per forward pass when sampling (grid and quality metrics); the chunks are shared among the processes, and the images do not depend on their number."})
    save_images_epochs: int | None = field(default=None, metadata={"help": "diffusers' cadence: a sample grid every N epochs (N x steps per epoch); replaces --sample_steps."})
    save_model_epochs: int | None = field(default=None, metadata={"help": "diffusers' cadence: save the pipeline to --output_dir every N epochs (it is always saved at the end)."})
    inception_weights: str | None = field(default=None, metadata={"help": "Path to FID Inception weights on disk, for FID on non-digits data."})

    # ---- checkpoints ---------------------------------------------------------------------------
    checkpointing_steps: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: off)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder; 'latest' (the output folder must exist); or 'auto' (resume if there is a checkpoint, else start)."})

    # ---- hub -----------------------------------------------------------------------------------
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the pipeline and a model card at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id on the Hub (default: the output folder's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login). Never logged."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    # ---- resume ----------------------------------------------------------------------------------
    allow_config_change: bool = field(default=False, metadata={"help": "On resume, accept experiment-defining flags that differ from the checkpoint's (optimizer, lr, batch...); the change is applied and recorded in config.json."})

    def __post_init__(self) -> None:
        if self.logger is not None and self.report_to == "none":
            self.report_to = self.logger

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict of the config; secrets are redacted unless asked otherwise."""
        data = dataclasses.asdict(self)
        if redact:
            for key in SECRET_FIELDS:
                if data.get(key):
                    data[key] = "<redacted>"
        return data


def flag_aliases(cls: type = TrainConfig) -> dict[str, str]:
    """diffusers' names of our flags (e.g. eval_batch_size -> num_samples), from each field's `aliases`."""
    return {alias.lstrip("-"): f.name for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}


# (lowest allowed value, whether the lowest value itself is allowed) of every numeric flag; None is always allowed
# where the field's default is None ("unset"). Checked at parse time, so bad numbers never reach the trainer.
RANGES: dict[str, tuple[float, bool]] = {
    "resolution": (1, True), "max_train_samples": (1, True), "num_validation_images": (0, True), "grad_probe_images": (1, True),
    "dataloader_num_workers": (0, True), "ddpm_num_steps": (1, True), "snr_gamma": (0, False),
    "learning_rate": (0, False), "adam_beta1": (0, True), "adam_beta2": (0, True), "adam_weight_decay": (0, True),
    "adam_epsilon": (0, False), "momentum": (0, True), "max_grad_norm": (0, True), "lr_warmup_steps": (0, True),
    "lr_num_cycles": (0, False), "train_batch_size": (1, True), "gradient_accumulation_steps": (1, True),
    "max_train_steps": (1, True), "stop_after_steps": (1, True), "num_epochs": (1, True), "seed": (0, True),
    "init_seed": (0, True), "ema_inv_gamma": (0, False), "ema_power": (0, False), "ema_max_decay": (0, False),
    "max_nonfinite_steps": (1, True), "num_timestep_buckets": (1, True), "logging_steps": (0, True),
    "validation_steps": (0, True), "sample_steps": (0, True), "eval_steps": (0, True), "num_samples": (1, True),
    "num_eval_samples": (1, True), "num_inference_steps": (1, True), "sample_batch_size": (1, True),
    "checkpointing_steps": (0, True),
    "checkpoints_total_limit": (1, True), "save_images_epochs": (1, True), "save_model_epochs": (1, True),
    "num_validation_draws": (1, True), "max_bad_images": (0, True), "ddp_timeout": (1, True),
}
UPPER_BOUNDS = {"adam_beta1": 1.0, "adam_beta2": 1.0, "ema_max_decay": 1.0}  # inclusive only for ema_max_decay


def check_ranges(cfg: TrainConfig) -> None:
    """Every numeric flag finite and in range, as one `--flag must be ...` UserError (before anything is touched)."""
    for name, tp in field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number (got {value})")
        if name in RANGES:
            low, inclusive = RANGES[name]
            if value < low or (value == low and not inclusive):
                bound = f"at least {low:g}" if inclusive else f"> {low:g}"
                unset = " or left unset" if _is_optional(tp) else ""
                raise UserError(f"--{name} must be {bound}{unset} (got {value:g})")
        high = UPPER_BOUNDS.get(name)
        if high is not None and (value > high or (value == high and name != "ema_max_decay")):
            raise UserError(f"--{name} must be below {high:g} (got {value:g})")
    if cfg.num_timestep_buckets > cfg.ddpm_num_steps:
        raise UserError(f"--num_timestep_buckets ({cfg.num_timestep_buckets}) cannot exceed --ddpm_num_steps "
                        f"({cfg.ddpm_num_steps})")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with the values of secret flags (--hub_token X, --hub_token=X) hidden."""
    secret_flags = {f"--{name}" for name in SECRET_FIELDS} | {f"--{name.replace('_', '-')}" for name in SECRET_FIELDS}
    redacted, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            arg = "<redacted>"
        elif flag in secret_flags and eq:
            arg = f"{flag}=<redacted>"
        hide_next = not hide_next and arg in secret_flags
        redacted.append(arg)
    return redacted


def split_secrets(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv without the secret flags (--hub_token X, --hub_token=X), and {field: value} of those it held."""
    secret_flags = {f"--{n}": n for n in SECRET_FIELDS} | {f"--{n.replace('_', '-')}": n for n in SECRET_FIELDS}
    kept, secrets, i = [], {}, 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in secret_flags:
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            secrets[secret_flags[flag]] = value
        else:
            kept.append(argv[i])
        i += 1
    return kept, secrets


def experiment_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{flag: (saved, now)} for the experiment-defining flags (all but FREE_FIELDS and OPTIMIZER_FIELDS) that differ."""
    ignored = set(FREE_FIELDS) | set(OPTIMIZER_FIELDS)
    diffs = {}
    for key in sorted((set(saved) & set(current)) - ignored):  # a flag newer than the checkpoint is not compared
        old, new = json.loads(json.dumps(saved.get(key))), json.loads(json.dumps(current.get(key)))
        # unset now, resolved at run time from flags compared here (lr_scheduler from the optimizer, warmup from
        # the step count): the checkpoint holds the resolved value, so unset means "as before"
        if old != new and new is not None:
            diffs[key] = (old, new)
    return diffs


@dataclass(frozen=True)
class BatchLayout:
    """How a launch splits a step's images: --train_batch_size (per process) x processes x accumulation steps.

    The data order and the noise are functions of the global micro-batch (per-process batch x processes), its index
    and a sample's place in it (sampling.BatchStream, sampling.micro_batch_noise), not of the process count: two
    layouts with the same micro-batch and accumulation steps train the same experiment."""

    per_process: int
    processes: int
    accumulation: int

    @property
    def micro_batch(self) -> int:
        return self.per_process * self.processes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation

    def same_experiment(self, other: BatchLayout) -> bool:
        # not the global batch alone: noise is keyed by the micro-batch, so 2 processes x 4 and 1 process x 4 x 2
        # accumulation steps see the same images with other noise
        return self.micro_batch == other.micro_batch and self.accumulation == other.accumulation

    def __str__(self) -> str:
        parts = [f"{self.processes} process{'es' if self.processes > 1 else ''}", str(self.per_process)]
        if self.accumulation > 1:
            parts.append(f"{self.accumulation} accumulation steps")
        return f"{self.global_batch} ({' x '.join(parts)})"


def layout_refusal(saved: BatchLayout, now: BatchLayout) -> str:
    """What differs between the checkpoint's layout and this launch's, and the flags that continue the checkpoint's."""
    what = f"checkpoint at global batch {saved}; this launch gives {now}"
    if saved.micro_batch % now.processes:
        return (f"{what}: its micro-batch of {saved.micro_batch} images does not split over {now.processes} "
                f"processes; resume on a process count that divides {saved.micro_batch} to continue the same experiment")
    fix = f"--train_batch_size {saved.micro_batch // now.processes}"
    if now.accumulation != saved.accumulation:
        fix += f" --gradient_accumulation_steps {saved.accumulation}"
    return f"{what}: pass {fix} to continue the same experiment"


# What a change of process count may change with it; the rest of the experiment is compared as usual.
LAYOUT_KEYS = ("train_batch_size", "gradient_accumulation_steps", "num_processes", "global_batch_size")


def resumed_layouts(state: dict[str, Any], cfg: TrainConfig, num_processes: int) -> tuple[BatchLayout, BatchLayout] | None:
    """(the checkpoint's batch layout, this launch's) when the process count changed; None when it did not, or for
    a checkpoint older than the record of its process count."""
    saved_processes, saved = state.get("num_processes"), state.get("config")
    if saved is None or saved_processes in (None, num_processes):
        return None
    return (BatchLayout(saved["train_batch_size"], saved_processes, saved.get("gradient_accumulation_steps", 1)),
            BatchLayout(cfg.train_batch_size, num_processes, cfg.gradient_accumulation_steps))


def layout_changes(saved: BatchLayout, now: BatchLayout) -> dict[str, tuple]:
    """{what: (checkpoint's, now)} of a new process count: none when it continues the same experiment."""
    if saved.same_experiment(now):
        return {}
    changes = {"num_processes": (saved.processes, now.processes)}
    if saved.per_process != now.per_process:
        changes["train_batch_size"] = (saved.per_process, now.per_process)
    if saved.global_batch != now.global_batch:
        changes["global_batch_size"] = (saved.global_batch, now.global_batch)
    return changes


def resolved_init_seed(cfg: TrainConfig) -> int:
    """The seed of the initial weights: --init_seed, else 0 with --fixed_init, else --seed."""
    if cfg.init_seed is not None:
        return cfg.init_seed
    return 0 if cfg.fixed_init else cfg.seed


def field_types(cls: type = TrainConfig) -> dict[str, Any]:
    """Resolved type hints of the config's fields."""
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; Literal[...] -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    return tp


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal[...] field (through `| None`), else ()."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return sum((_literal_choices(a) for a in typing.get_args(tp)), ())
    return ()


def coerce_value(name: str, value: Any, tp: Any) -> Any:
    """Convert a value read from YAML/JSON (e.g. the string '1e-4') to the field's declared type."""
    if value is None:
        return None
    base = _base_type(tp)
    choices = _literal_choices(tp)
    if value is False and "no" in choices:  # YAML 1.1 reads `mixed_precision: no` as False
        value = "no"
    if choices and value not in choices:  # argparse never checks defaults (our file values) against choices
        raise UserError(f"config key '{name}': {value!r} is not one of {', '.join(map(str, choices))}")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if base is int:
            return int(float(value)) if isinstance(value, str) else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{name}': cannot read {value!r} as {base.__name__}") from None
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file of config keys, converting each value to its declared type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    types_ = field_types()
    unknown = sorted(set(data) - set(types_))
    if unknown:
        from diffusers_optim.errors import unknown_choice

        raise unknown_choice("config key", unknown[0], types_)
    return {k: coerce_value(k, v, types_[k]) for k, v in data.items()}


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and an optional --config FILE under them) into a TrainConfig."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    file_values: dict[str, Any] = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path")
        file_values = load_config_file(argv[i + 1])
        del argv[i : i + 2]
    # No abbreviations: a typo that happens to be a prefix must not silently set another flag.
    parser = HfArgumentParser(TrainConfig, allow_abbrev=False, prog=program_name(),
                              formatter_class=DefaultsOnceFormatter)
    parser.error = _flag_error
    parser.set_defaults(**file_values)
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise unknown_flag(next((a for a in unknown if a.startswith("-")), unknown[0]).split("=")[0])
    check_ranges(cfg)
    return cfg


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", but not when the help text already states the default or it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("%", "%%")  # argparse %-formats help: "10% of the run" must stay text
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def program_name() -> str:
    """`--help`'s usage line: the script's own name when run as the script, else the CLI command."""
    script = Path(sys.argv[0]).name
    return script if script.startswith("train_") and script.endswith(".py") else "diffusers-optim train"


def flag_hint(name: str) -> str:
    """What an unknown flag most likely means: its meaning when we know it, else the closest spelling."""
    key = name.lstrip("-").replace("-", "_")
    if key in FLAG_MEANINGS:
        meaning = FLAG_MEANINGS[key]
        return f" Did you mean {meaning}?" if meaning.startswith("--") else f" In diffusers-optim, {meaning}."
    hint = closest_match(key, field_types())
    return f" Did you mean --{hint}?" if hint else ""


def unknown_flag(flag: str, what: str = "flag") -> UserError:
    """The one-line error for an unknown training flag (or config key), with a hint that considers meaning."""
    return UserError(f"unknown {what} {flag}.{flag_hint(flag)} (`diffusers-optim train --help` lists the flags)")


def _flag_error(message: str) -> typing.NoReturn:
    """argparse's error, as one line instead of the whole usage text."""
    if message.endswith("expected one argument"):
        message += " (write a value that starts with '-' as --flag=-1e-4)"
    raise UserError(f"{message} (`diffusers-optim train --help` lists the flags)")
