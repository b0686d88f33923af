"""Publish a finished run to the Hub: access check before training, a model card that records how the model
was trained (optimizer and every hyperparameter), and an upload of the pipeline only.

The card is built from the run folder's own files (config.json, run_summary.json), so the upload at the end of a
run and `diffusers-optim push RUN_DIR` later publish the same card and the same files.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from diffusers_optim import rundir
from diffusers_optim.errors import UserError

SECRET_KEY_PARTS = ("token", "api_key", "apikey", "secret", "password")
REDACTED = "<redacted>"
# A Hub token that slipped into a value we did not expect (e.g. a run name).
TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
TASK = "unconditional-image-generation"

CARD = "README.md"  # the model card, written into the run folder before the upload
# What a model repository gets: the DDPMPipeline, the card, the run config and the final sample grid.
UPLOAD_ALLOW = [CARD, "model_index.json", "unet/*", "scheduler/*", rundir.CONFIG, f"{rundir.SAMPLES}/final*"]
# Never uploaded even if an allow pattern matches: resumable state, logs, tracker folders, raw metrics.
UPLOAD_IGNORE = [
    f"{rundir.CHECKPOINTS}/*",
    f"*/{rundir.CHECKPOINTS}/*",
    "logs/*",
    "wandb/*",
    "tensorboard/*",
    "runs/*",
    "*.jsonl",
    "*.jsonl.*",
    "*tfevents*",
    rundir.WANDB_ID,
    ".*",
    "*/.*",
]


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _token(cfg: Any) -> str | None:
    """--hub_token, else HF_TOKEN or the saved login."""
    return cfg.hub_token or get_token()


def _check_repo_id(repo_id: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"'{repo_id}' is not a valid Hub repository id (letters, digits, '-', '_', '.'); pass --hub_model_id"
        ) from None
    return repo_id


def _compose_repo_id(cfg: Any, username: str | None) -> str:
    name = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    if "/" not in name and username:
        name = f"{username}/{name}"
    return _check_repo_id(name)


def resolve_repo_id(cfg: Any, api: HfApi | None = None, token: str | None = None) -> str:
    """--hub_model_id, else the output folder's name; the user's namespace is added when none is given."""
    name = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    if "/" in name:
        return _check_repo_id(name)
    api = api or HfApi()
    return _compose_repo_id(cfg, api.whoami(token=token or _token(cfg))["name"])


def _one_line(err: Exception, token: str | None) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return text.replace(token, REDACTED) if token else text


def check_hub_access(cfg: Any, api: HfApi | None = None, what: str = "--push_to_hub") -> str:
    """Fail in seconds, before training, if --push_to_hub cannot work; create the repo and return its id.

    what: who asks, for the messages (`--push_to_hub`, or `push` for the command)."""
    if _offline():
        raise UserError(f"{what} needs network, but HF_HUB_OFFLINE is set")
    token = _token(cfg)
    if not token:
        raise UserError(f"{what} needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass --hub_token")
    api = api or HfApi()
    try:
        username = api.whoami(token=token)["name"]
    except Exception as err:  # bad token, no network, proxy: all mean "cannot push"
        raise UserError(
            f"{what}: cannot reach the Hub with this token ({type(err).__name__}: {_one_line(err, token)})"
        ) from None
    repo_id = _compose_repo_id(cfg, username)
    try:
        api.create_repo(repo_id, private=cfg.hub_private_repo, exist_ok=True, token=token)
    except Exception as err:
        raise UserError(f"{what}: cannot create {repo_id} ({_one_line(err, token)})") from None
    return repo_id


def redact(value: Any) -> Any:
    """Copy of value with secrets removed: any key naming a secret, and any string that looks like a token."""
    if isinstance(value, dict):
        return {
            k: (
                REDACTED
                if value[k] and any(p in str(k).lower() for p in SECRET_KEY_PARTS)
                else redact(value[k])
            )
            for k in value
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return TOKEN_RE.sub(REDACTED, value)
    return value


def _fmt(value: Any) -> str:
    """A value as it should read in a markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = "(" + ", ".join(_fmt(v) for v in value) + ")"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any], headers: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {headers[0]} | {headers[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _eval_results(metrics: dict[str, float], dataset: str, dataset_type: str) -> list[EvalResult]:
    """model-index entries for val/loss and every eval/* metric (non-finite values are left out)."""
    keys = [k for k in sorted(metrics) if k == "val/loss" or k.startswith("eval/")]
    return [
        EvalResult(
            task_type=TASK,
            dataset_type=dataset_type,
            dataset_name=dataset,
            metric_type=key,
            metric_name=key,
            metric_value=float(metrics[key]),
        )
        for key in keys
        if isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key])
    ]


def _hub_dataset(config: dict[str, Any]) -> str | None:
    """The data set's Hub id, when it came from the Hub (not a local folder nor the built-in digits)."""
    name = config.get("dataset_name")
    if not name or config.get("train_data_dir") or Path(str(name)).exists():
        return None
    return name


def _card_data(run: dict[str, Any], model_name: str) -> ModelCardData:
    config, optimizer = run["config"], run["optimizer"]
    # an import path (torch.optim.NAdam, my_pkg.mod:MyOpt) becomes a tag the Hub accepts: torch-optim-nadam
    name = re.sub(r"[^a-z0-9_-]+", "-", str(optimizer["name"]).lower())
    hub_dataset = _hub_dataset(config)
    tags = ["diffusers", TASK, "diffusers-optim", "ddpm", name, f"optimizer-{name}"]
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag=TASK,
        license=run.get("license"),
        tags=list(dict.fromkeys(tags)),
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name,
        eval_results=_eval_results(run.get("metrics", {}), run["dataset"], hub_dataset or run["dataset"])
        or None,
    )


def _learning_rate(run: dict[str, Any]) -> Any:
    """The peak learning rate: the flag, else the optimizer's own default the run was built with."""
    lr = run["config"].get("learning_rate")
    if lr is None and "lr" in run["optimizer"].get("hparams", {}):
        return f"{_fmt(run['optimizer']['hparams']['lr'])} (the optimizer's default)"
    return lr


def _training_rows(run: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide how training went, in reading order."""
    c, procs = run["config"], run.get("num_processes", 1)
    batch, accum = c.get("train_batch_size"), c.get("gradient_accumulation_steps", 1)
    schedule = str(c.get("lr_scheduler"))
    if "cosine" in schedule:
        schedule += f" (cycles {c.get('lr_num_cycles')})"
    ema = "off"
    if c.get("use_ema"):
        ema = f"on (max_decay {c.get('ema_max_decay')}, inv_gamma {c.get('ema_inv_gamma')}, power {c.get('ema_power')})"
    return {
        "optimizer": run["optimizer"]["name"],
        "learning_rate": _learning_rate(run),
        "lr_scheduler": schedule,
        "lr_warmup_steps": c.get("lr_warmup_steps"),
        "max_grad_norm": c.get("max_grad_norm") or "off",
        "optimizer steps": run.get("steps", c.get("max_train_steps")),
        "batch size": f"{batch} per process x {accum} accumulation x {procs} processes = {batch * accum * procs}",
        "mixed_precision": run.get("mixed_precision") or c.get("mixed_precision") or "no",
        "EMA": ema,
        "data set": f"{run['dataset']} at {c.get('resolution')}x{c.get('resolution')}",
        "model": c.get("model_config_name_or_path") or f"preset {c.get('model_preset')}",
        "prediction_type": c.get("prediction_type"),
        "noise schedule": f"DDPM, {c.get('ddpm_num_steps')} steps, {c.get('ddpm_beta_schedule')} betas",
        "snr_gamma": c.get("snr_gamma") or "off",
        "seed / init_seed": f"{c.get('seed')} / {c.get('init_seed')}",
    }


def _usage(repo_id: str, config: dict[str, Any]) -> str:
    steps = config.get("num_inference_steps", 1000)
    return "\n".join(
        [
            "```python",
            "from diffusers import DDPMPipeline",
            "",
            f'pipeline = DDPMPipeline.from_pretrained("{repo_id}")',
            f"images = pipeline(batch_size=16, num_inference_steps={steps}).images",
            'images[0].save("sample.png")',
            "```",
        ]
    )


def _body(run: dict[str, Any], model_name: str, repo_id: str) -> str:
    opt, config = run["optimizer"], run["config"]
    parts = [
        f"# {model_name}",
        f"An unconditional DDPM `UNet2DModel` trained with the **{opt['name']}** optimizer "
        "with diffusers-optim, which studies how the optimizer changes diffusion training.",
    ]
    if run.get("sample_grid"):
        parts.append(f"![Samples from the final model]({run['sample_grid']})")
    parts += ["## Usage", _usage(repo_id, config)]
    if run.get("metrics"):
        parts += ["## Results", _table(run["metrics"], ("metric", "value"))]
    parts += ["## Training", _table(_training_rows(run))]
    parts += [
        f"### Optimizer: {opt['name']}",
        f"From `{opt.get('package') or 'torch'}`. Every hyperparameter it was built with:",
        _table(opt.get("hparams", {}), ("hyperparameter", "value")),
    ]
    if opt.get("flags"):
        parts += [
            "Registry flags (how the trainer treats this optimizer):",
            _table(opt["flags"], ("flag", "value")),
        ]
    parts += [
        "### Full run config",
        "<details><summary>every flag of the run</summary>\n",
        _table(config),
        "\n</details>",
    ]
    if run.get("versions"):
        parts += ["### Package versions", _table(run["versions"], ("package", "version"))]
    return "\n\n".join(parts) + "\n"


def build_model_card(run: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """A model card recording the optimizer, every hyperparameter, the schedule, results and usage."""
    run = redact(run)
    config = run["config"]
    repo_id = repo_id or config.get("hub_model_id") or Path(config.get("output_dir", "model")).name
    model_name = repo_id.split("/")[-1]
    data = _card_data(run, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(run, model_name, repo_id)}")


def upload_patterns(sample_grid: str | None = None) -> list[str]:
    """Allow patterns of an upload: the fixed set plus the card's sample grid, wherever the trainer put it."""
    return UPLOAD_ALLOW + ([Path(sample_grid).as_posix()] if sample_grid else [])


def files_to_upload(output_dir: Path, sample_grid: str | None = None) -> list[str]:
    """Relative paths of output_dir that push_run sends, by the Hub client's own pattern filter."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(output_dir).as_posix() for p in Path(output_dir).rglob("*") if p.is_file())
    allow = upload_patterns(sample_grid)
    return list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=UPLOAD_IGNORE))


def _check_no_token_in(output_dir: Path, token: str | None, sample_grid: str | None) -> None:
    """Refuse to upload a file holding the token (the run config is redacted, but a user file may not be)."""
    if not token:
        return
    for rel in files_to_upload(output_dir, sample_grid):
        path = Path(output_dir) / rel
        if path.suffix in (".json", ".md", ".yaml", ".yml", ".txt") and token in path.read_text(
            errors="ignore"
        ):
            raise UserError(f"refusing to upload {path}: it contains your Hub token")


def push_command(output_dir: Path, repo_id: str | None = None, private: bool = False) -> str:
    """The one command that publishes this run later (never with a token: the command finds it as train does)."""
    words = ["diffusers-optim", "push", str(Path(output_dir).resolve())]
    words += ["--hub_model_id", repo_id] if repo_id else []
    return shlex.join(words + (["--hub_private_repo"] if private else []))


def save_card(output_dir: Path, card: ModelCard) -> None:
    """README.md in the run folder; an unchanged card is left as it is (a repeated push rewrites nothing)."""
    path, text = Path(output_dir) / CARD, str(card)
    if not (path.is_file() and path.read_bytes() == text.encode("utf-8")):
        rundir.write_text(path, text)


def push_run(
    output_dir: Path,
    repo_id: str,
    card: ModelCard,
    token: str | None = None,
    api: HfApi | None = None,
    commit_message: str = "Upload diffusers-optim run",
    sample_grid: str | None = None,
    private: bool = False,
) -> str:
    """Write the card as README.md and upload the pipeline, card, config and final grid; return the URL.

    sample_grid: the grid's path relative to output_dir (as in the card), when not named samples/final*.
    private: the repository's visibility, for the retry command a failure names.
    """
    output_dir = Path(output_dir)
    if not (output_dir / "model_index.json").is_file():
        raise UserError(f"no saved pipeline in {output_dir} (model_index.json is missing); nothing to push")
    save_card(output_dir, card)
    _check_no_token_in(output_dir, token, sample_grid)
    api = api or HfApi()
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=commit_message,
            token=token,
            allow_patterns=upload_patterns(sample_grid),
            ignore_patterns=list(UPLOAD_IGNORE),
        )
    except Exception as err:
        raise UserError(
            f"upload to {repo_id} failed ({type(err).__name__}: {_one_line(err, token)}); "
            f"the run is safe in {output_dir}; publish it with: {push_command(output_dir, repo_id, private)}"
        ) from None
    return str(getattr(info, "repo_url", "") or f"https://huggingface.co/{repo_id}")


# ---- a finished run, published from its folder (at the end of training and by `diffusers-optim push`) ----
def run_card_info(output_dir: Path) -> dict[str, Any]:
    """What the model card records, read from the run folder: the run config and the final summary."""
    run = rundir.read_json(Path(output_dir) / rundir.CONFIG)
    summary = rundir.read_json(Path(output_dir) / rundir.SUMMARY)
    final = summary.get("final", {})
    return {"config": run.get("config", {}), "optimizer": run.get("optimizer", {}), "dataset": run.get("dataset"),
            "num_processes": run.get("num_processes", 1), "steps": summary.get("steps"),
            "versions": run.get("versions"), "sample_grid": summary.get("sample_grid"),
            "metrics": {k: v for k, v in final.items() if k.startswith(("eval/", "val/")) and v is not None}}


def publish_run(output_dir: Path, repo_id: str, token: str | None = None, private: bool = False,
                api: HfApi | None = None) -> str:
    """Card from the run folder, then the upload (push_run); returns the repository's URL.

    token: --hub_token, else HF_TOKEN or the saved login (resolved here, so the token-in-a-file check uses it)."""
    info = run_card_info(output_dir)
    card = build_model_card(info, repo_id=repo_id)
    return push_run(output_dir, repo_id, card, token=token or get_token(), api=api,
                    sample_grid=info["sample_grid"], private=private)


def check_finished(output_dir: Path) -> None:
    """Only a finished run is published: one not saved to the end would be a model nobody trained."""
    if not output_dir.is_dir():
        raise UserError(f"push: run folder not found: {output_dir}")
    if rundir.lock_holder(output_dir) is not None:
        raise UserError(rundir.in_use_message(output_dir))
    if not rundir.is_complete(output_dir):
        raise UserError(f"push: {output_dir} is not a finished run (no complete {rundir.SUMMARY}); finish it with "
                        f"its train command and --resume_from_checkpoint latest, then push")


def push_finished_run(output_dir: Path, hub_model_id: str | None = None, token: str | None = None,
                      private: bool = False, api: HfApi | None = None) -> str:
    """`diffusers-optim push`: the end-of-run upload of a finished run, any time later; returns the URL."""
    output_dir = Path(output_dir)
    check_finished(output_dir)
    recorded = rundir.read_json(output_dir / rundir.CONFIG).get("config", {})
    # the repository the run would have pushed to: --hub_model_id, else the run's own, else the folder's name
    cfg = SimpleNamespace(hub_model_id=hub_model_id or recorded.get("hub_model_id"), output_dir=str(output_dir),
                          hub_token=token, hub_private_repo=private or bool(recorded.get("hub_private_repo")))
    api = api or HfApi()
    repo_id = check_hub_access(cfg, api, what="push")
    with rundir.locked(output_dir):  # the card is written there: no trainer may start on the folder meanwhile
        return publish_run(output_dir, repo_id, token, cfg.hub_private_repo, api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffusers-optim push",
        description="Publish a finished run to the Hub: the pipeline, the model card, config.json and the final "
        "sample grid (the upload --push_to_hub makes at the end; checkpoints, logs and metrics stay local).",
    )
    parser.add_argument("run_dir", help="The run's folder (the --output_dir of `train`).")
    parser.add_argument("--hub_model_id", default=None,
                        help="Repository id (default: the run's --hub_model_id, else the folder's name; your "
                        "namespace is added when none is given).")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--hub_private_repo", action="store_true",
                        help="Create the repository as private (if it does not exist yet).")
    args = parser.parse_args(argv)
    url = push_finished_run(Path(args.run_dir), args.hub_model_id, args.hub_token, args.hub_private_repo)
    print(f"uploaded {args.run_dir} to {url}")
    return 0
