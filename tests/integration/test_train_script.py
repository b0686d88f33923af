"""The training script end to end, run as a user runs it: real diffusers, accelerate and wandb (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "train_scripts" / "train_unconditional.py"
TINY = [
    "--model_preset", "tiny", "--resolution", "16", "--train_batch_size", "8", "--lr_warmup_steps", "2",
    "--num_validation_images", "16", "--num_inference_steps", "4", "--num_samples", "4", "--num_eval_samples", "16",
    "--learning_rate", "1e-3",
]


def env(**extra: str) -> dict[str, str]:
    base = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base.pop("WANDB_API_KEY", None)
    return {**base, **extra}


def run_script(args: list[str], launcher: list[str] | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), *TINY, *args]
    proc = subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leet_records(run_dir: Path) -> list[dict]:
    """Every record of an offline W&B run, as W&B itself reads the transaction log."""
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def bucket_names(prefix: str) -> list[str]:
    return [f"{prefix}/000-249", f"{prefix}/250-499", f"{prefix}/500-749", f"{prefix}/750-999"]


def probe_names(momentum: bool = True) -> set[str]:
    """Every grad_t/ key of a 4-bucket run (momentum keys only for an optimizer with a first-moment buffer)."""
    ranges = [k.split("/")[1] for k in bucket_names("x")]
    pairs = [f"grad_t/cos/{a}__{b}" for i, a in enumerate(ranges) for b in ranges[i + 1:]]
    names = {*bucket_names("grad_t/norm"), *bucket_names("grad_t/update_cos"), *pairs, "grad_t/cos_mean",
             "grad_t/full_norm", "grad_t/full_update_cos"}
    return names | ({*bucket_names("grad_t/momentum_cos"), "grad_t/full_momentum_cos"} if momentum else set())


def probe_values(records: list[dict]) -> dict[tuple[int, str], float]:
    return {(r["step"], k): v for r in records for k, v in r.items() if k.startswith("grad_t/")}


@pytest.mark.slow
def test_wandb_offline_run_has_every_metric_and_pipeline_loads(tmp_path):
    out = tmp_path / "run"
    run_script(["--max_train_steps", "12", "--logging_steps", "4", "--validation_steps", "6", "--sample_steps", "6",
                "--output_dir", str(out), "--report_to", "wandb", "--run_group", "itest", "--grad_probe_steps", "6"])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = leet_records(runs[0])
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    logged = set().union(*history)
    expected = {*bucket_names("loss_t"), *bucket_names("val_t"), "train/loss", "val/loss", "train/grad_norm",
                "train/lr", "train/param_norm", "train/update_ratio", "perf/images_per_sec", "optim/state_mb",
                "train/effective_lr", "optim/state_bytes_per_param", "perf/process_peak_rss_mb", "train/images_seen",
                "val/loss_se", *bucket_names("val_t_se"), "eval/fd", "eval/precision", "eval/recall",
                "eval_floor/fd", *probe_names()}
    assert expected <= logged, expected - logged
    probed = [h for h in history if "grad_t/full_norm" in h]
    assert [h["train/step"] for h in probed] == [6, 12]  # AdamW's exp_avg exists by step 6: momentum keys too
    images = [h for h in history if h.get("samples/grid._type") == "image-file"]
    assert len(images) == 2  # steps 6 and 12
    run_record = next(r["run"] for r in records if r.get("type") == "run")
    assert run_record["display_name"] == "adamw-lr0.001-s0" and "adamw" in run_record["tags"]

    # metrics.jsonl holds the same scalar keys, at the same steps, with the same values
    lines = read_jsonl(out / "metrics.jsonl")
    local = set().union(*lines)
    assert expected <= local
    by_step = {h["train/step"]: h for h in history if "train/loss" in h}
    for line in lines:
        if "train/loss" in line:
            assert by_step[line["step"]]["train/loss"] == pytest.approx(line["train/loss"])
    for step, h in ((h["train/step"], h) for h in probed):
        line = next(x for x in lines if x["step"] == step)
        assert {k: h[k] for k in probe_names()} == pytest.approx({k: line[k] for k in probe_names()})
    assert [line["step"] for line in lines] == [4, 6, 8, 12]
    counts = sum(lines[0][k] for k in bucket_names("count_t"))
    assert counts == 4 * 8  # 4 steps x batch 8, every sample in exactly one bucket

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and torch.isfinite(torch.from_numpy(images)).all()
    assert (out / "samples" / "step_000012.png").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 12


def test_resume_continues_as_if_never_stopped(tmp_path, monkeypatch):
    """With EMA, through the CLI in this process (a resume in a new process, after SIGKILL, is test_crash_resume's)."""
    from diffusers_optim import cli

    common = [*TINY, "--max_train_steps", "8", "--logging_steps", "2", "--validation_steps", "4", "--sample_steps", "0",
              "--checkpointing_steps", "4", "--eval_steps", "0", "--num_eval_samples", "8", "--optimizer", "adamw",
              "--use_ema"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(["train", *common, "--output_dir", str(straight)]) == 0
    assert cli.main(["train", *common, "--output_dir", str(resumed), "--stop_after_steps", "4"]) == 0
    assert not (resumed / "run_summary.json").exists()
    assert cli.main(["train", *common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0

    def losses(path: Path) -> list[tuple]:
        return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in read_jsonl(path / "metrics.jsonl")]

    assert losses(straight) == losses(resumed)
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """Real DDP over gloo: one W&B run, global bucket counts, same loss curve as one process at batch 2B, and the
    same sample grid and quality metrics (each process samples its share, the main one scores them all)."""
    # a grid and quality metrics every step, in chunks of 3 images: the 4-image grid is 3 images on one process
    # and 1 on the other, the 16 eval samples 9 and 7 (a short last chunk)
    common = ["--max_train_steps", "6", "--logging_steps", "2", "--validation_steps", "6", "--sample_steps", "1",
              "--report_to", "wandb", "--eval_steps", "1", "--sample_batch_size", "3", "--max_grad_norm", "1.0",
              "--grad_probe_steps", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script([*common, "--output_dir", str(one), "--train_batch_size", "8"])
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    run_script([*common, "--output_dir", str(two), "--train_batch_size", "4"], launcher=launcher,
               ACCELERATE_USE_CPU="true")
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    config = json.loads((two / "config.json").read_text())
    assert config["num_processes"] == 2
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        if "train/loss" not in ra:
            continue
        assert sum(rb[k] for k in bucket_names("count_t")) == 2 * 8  # 2 steps x global batch 8
        assert [ra[k] for k in bucket_names("count_t")] == [rb[k] for k in bucket_names("count_t")]
        # Same images, noise and timesteps; only the float summation order differs (DDP all-reduce).
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4)
    assert b[-1]["val/loss"] == pytest.approx(a[-1]["val/loss"], rel=1e-3)
    # the gradient probes: the same global probe batch, gradients summed across the processes
    probes_a, probes_b = probe_values(a), probe_values(b)
    assert {k for _, k in probes_a} == probe_names() and probes_a.keys() == probes_b.keys()
    assert probes_b == pytest.approx(probes_a, rel=1e-4, abs=1e-6)
    # After step 1 (learning rate 0 in the warmup) both runs hold the initial weights bit for bit: the grid and the
    # quality metrics are then exactly one process's. Later steps' weights differ by the all-reduce's rounding.
    assert (two / "samples" / "step_000001.png").read_bytes() == (one / "samples" / "step_000001.png").read_bytes()
    quality = {k: v for k, v in a[0].items() if k.startswith(("eval/", "eval_floor/"))}
    assert {"eval/fd", "eval/kid", "eval/precision", "eval/coverage", "eval/classes_covered"} <= quality.keys()
    assert {k: v for k, v in b[0].items() if k.startswith(("eval/", "eval_floor/"))} == quality
    assert {k: b[-1][k] for k in quality} == pytest.approx({k: a[-1][k] for k in quality}, rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_bf16_on_cpu_finishes_with_finite_losses_and_probes_match_two_processes(tmp_path):
    """bf16 autocast with gradient accumulation: finite losses, and the probes of 2 processes match 1 process."""
    common = ["--max_train_steps", "4", "--logging_steps", "2", "--validation_steps", "4", "--sample_steps", "4",
              "--mixed_precision", "bf16", "--eval_steps", "0", "--gradient_accumulation_steps", "2",
              "--grad_probe_steps", "2"]
    out, two = tmp_path / "bf16", tmp_path / "bf16_two"
    run_script([*common, "--output_dir", str(out), "--train_batch_size", "4"])
    lines = read_jsonl(out / "metrics.jsonl")
    config = json.loads((out / "config.json").read_text())
    assert config["mixed_precision"] == "bf16"
    values = [v for r in lines for k, v in r.items() if k.startswith(("train/loss", "loss_t/", "val", "grad_t/"))]
    assert values and all(v is not None and torch.isfinite(torch.tensor(v)) for v in values)
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "29518"]
    run_script([*common, "--output_dir", str(two), "--train_batch_size", "2"], launcher=launcher,
               ACCELERATE_USE_CPU="true")
    probes_one, probes_two = probe_values(lines), probe_values(read_jsonl(two / "metrics.jsonl"))
    assert {k for _, k in probes_one} == probe_names() and probes_one.keys() == probes_two.keys()
    # Step 2 probes the initial weights (the warmup's lr is 0 at step 1): the same bf16 forward passes, sums
    # in another order. By step 4, bf16 training steps on differently split batches have moved the weights
    # apart by bf16 rounding (8 bits of mantissa): the probes agree to that resolution.
    at = {step: {k: v for (s, k), v in probes_one.items() if s == step} for step in (2, 4)}
    assert {k: probes_two[(2, k)] for k in at[2]} == pytest.approx(at[2], rel=1e-4, abs=1e-6)
    assert {k: probes_two[(4, k)] for k in at[4]} == pytest.approx(at[4], rel=1e-2, abs=1e-4)


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars_and_the_grid(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard comes with the 'reports' extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run_script(["--max_train_steps", "4", "--logging_steps", "2", "--validation_steps", "2", "--sample_steps", "4",
                "--eval_steps", "0", "--report_to", "tensorboard", "--output_dir", str(out), "--grad_probe_steps", "4"])
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    tags: dict[str, list] = {"scalars": [], "images": []}
    for path in events:
        acc = EventAccumulator(str(path.parent), size_guidance={"images": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] += acc.Tags()[kind]
    expected = {*bucket_names("loss_t"), *bucket_names("val_t"), "train/grad_norm", "train/lr", *probe_names()}
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    assert "samples/grid" in tags["images"]
