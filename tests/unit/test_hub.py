"""Hub publishing: access checks, the model card (real huggingface_hub code), what the upload would send."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from diffusers_optim import hub
from diffusers_optim.config import TrainConfig
from diffusers_optim.errors import UserError

FAKE_TOKEN = "hf_SECRETSECRET"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No network and no saved login leak in from the machine running the tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub, "get_token", lambda: None)


class FakeApi:
    """Records the HfApi calls hub.py makes; upload_folder lists the files the real client would send."""

    def __init__(self, user: str = "alice", fail_whoami: Exception | None = None):
        self.user, self.fail_whoami = user, fail_whoami
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []

    def whoami(self, token=None):
        self.calls.append(("whoami", {"token": token}))
        if self.fail_whoami:
            raise self.fail_whoami
        return {"name": self.user}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        # upload_folder always adds the client's default ignore patterns (.git, caches).
        ignore = list(kwargs.get("ignore_patterns") or []) + DEFAULT_IGNORE_PATTERNS
        self.uploaded = list(
            filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=ignore)
        )
        return SimpleNamespace(repo_url=f"https://huggingface.co/{kwargs['repo_id']}")


def make_cfg(tmp_path, **overrides) -> TrainConfig:
    """A config as the trainer records it: the schedule defaults resolved (a 500-step run: warmup 50)."""
    resolved = {"lr_scheduler": "cosine", "lr_warmup_steps": 50, **overrides}
    return TrainConfig(output_dir=str(tmp_path / "lion-digits"), push_to_hub=True, **resolved)


def make_run(cfg: TrainConfig, **overrides) -> dict:
    run = {
        "config": cfg.to_dict(),
        "optimizer": {
            "name": "lion",
            "hparams": {"lr": 3e-5, "betas": (0.9, 0.99), "weight_decay": 0.1},
            "package": "lion-pytorch",
            "flags": {"lr_is_multiplier": False, "needs_train_eval": False},
        },
        "metrics": {"val/loss": 0.0412, "eval/fid": 12.5, "eval/precision": 0.71, "train/loss": 0.05},
        "dataset": "digits",
        "num_processes": 2,
        "steps": 500,
        "versions": {"torch": "2.13.0", "diffusers": "0.42.1"},
        "sample_grid": "samples/final.png",
    }
    run.update(overrides)
    return run


def test_missing_token_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match="hf auth login.*HF_TOKEN.*--hub_token"):
        hub.check_hub_access(make_cfg(tmp_path), api=FakeApi())


def test_offline_mode_is_a_user_error(tmp_path):
    api = FakeApi()
    with pytest.raises(UserError, match="needs network, but HF_HUB_OFFLINE is set"):
        hub.check_hub_access(make_cfg(tmp_path, hub_token=FAKE_TOKEN), api=api)
    assert api.calls == []


def test_whoami_failure_is_one_line_without_the_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api = FakeApi(fail_whoami=ConnectionError(f"401 for token {FAKE_TOKEN}\ntraceback noise"))
    with pytest.raises(UserError) as info:
        hub.check_hub_access(make_cfg(tmp_path, hub_token=FAKE_TOKEN), api=api)
    message = str(info.value)
    assert "cannot reach the Hub" in message and "\n" not in message and FAKE_TOKEN not in message


def test_access_check_creates_repo_in_user_namespace(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env_123456")
    monkeypatch.setattr(hub, "get_token", lambda: __import__("os").environ.get("HF_TOKEN"))
    api = FakeApi(user="alice")
    repo_id = hub.check_hub_access(make_cfg(tmp_path, hub_private_repo=True), api=api)
    assert repo_id == "alice/lion-digits"
    assert api.calls == [
        ("whoami", {"token": "hf_from_env_123456"}),
        (
            "create_repo",
            {
                "repo_id": "alice/lion-digits",
                "private": True,
                "exist_ok": True,
                "token": "hf_from_env_123456",
            },
        ),
    ]


def test_resolve_repo_id(tmp_path):
    assert hub.resolve_repo_id(make_cfg(tmp_path, hub_model_id="org/model")) == "org/model"
    api = FakeApi(user="bob")
    assert (
        hub.resolve_repo_id(make_cfg(tmp_path, hub_model_id="model"), api=api, token=FAKE_TOKEN)
        == "bob/model"
    )
    assert hub.resolve_repo_id(make_cfg(tmp_path), api=api, token=FAKE_TOKEN) == "bob/lion-digits"
    with pytest.raises(UserError, match="not a valid Hub repository id"):
        hub.resolve_repo_id(make_cfg(tmp_path, hub_model_id="org/bad name"))


def test_model_card_round_trips_with_tags_results_and_training_record(tmp_path):
    cfg = make_cfg(
        tmp_path, use_ema=True, gradient_accumulation_steps=4, train_batch_size=32, mixed_precision="bf16"
    )
    card = hub.build_model_card(make_run(cfg), repo_id="alice/lion-digits")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    data = loaded.data
    assert data.library_name == "diffusers"
    assert {
        "diffusers",
        "unconditional-image-generation",
        "diffusers-optim",
        "lion",
        "optimizer-lion",
    } <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"val/loss": 0.0412, "eval/fid": 12.5, "eval/precision": 0.71}
    assert {r.dataset_name for r in data.eval_results} == {"digits"}
    assert {r.task_type for r in data.eval_results} == {"unconditional-image-generation"}

    text = loaded.text
    assert "![Samples from the final model](samples/final.png)" in text
    assert 'DDPMPipeline.from_pretrained("alice/lion-digits")' in text
    assert "32 per process x 4 accumulation x 2 processes = 256" in text
    assert "| `learning_rate` | 3e-05 (the optimizer's default) |" in text
    for needle in (
        "`betas` | (0.9, 0.99)",
        "`weight_decay` | 0.1",
        "`lr` | 3e-05",
        "lion-pytorch",
        "bf16",
        "`lr_warmup_steps` | 50",
        "`max_grad_norm` | 1",
        "max_decay 0.9999",
        "`prediction_type` | epsilon",
        "| `diffusers` | 0.42.1 |",
        "`lr_is_multiplier` | False",
    ):
        assert needle in text, needle


def test_non_finite_metrics_stay_out_of_model_index(tmp_path):
    run = make_run(make_cfg(tmp_path), metrics={"val/loss": float("nan"), "eval/fid": 3.0})
    card = hub.build_model_card(run, repo_id="a/b")
    assert [r.metric_type for r in card.data.eval_results] == ["eval/fid"]


def test_no_token_in_card_even_unredacted(tmp_path):
    cfg = make_cfg(tmp_path, hub_token=FAKE_TOKEN, run_name=f"oops-{FAKE_TOKEN}")
    run = make_run(cfg, config=cfg.to_dict(redact=False))
    run["optimizer"]["hparams"]["api_key"] = "k-123"
    card = hub.build_model_card(run, repo_id="alice/x")
    assert FAKE_TOKEN not in str(card) and "k-123" not in str(card)
    assert FAKE_TOKEN not in json.dumps(make_cfg(tmp_path, hub_token=FAKE_TOKEN).to_dict())


def write_run_folder(root: Path) -> None:
    """A finished run's output folder, with everything the trainer and trackers leave behind."""
    from diffusers import DDPMPipeline

    from diffusers_optim.models import build_noise_scheduler, build_unet

    DDPMPipeline(unet=build_unet("tiny", resolution=8), scheduler=build_noise_scheduler()).save_pretrained(
        root
    )
    junk = [
        "checkpoints/checkpoint-000010/model.safetensors",
        "checkpoints/checkpoint-000010/trainer_state.json",
        "checkpoints/.tmp-checkpoint-000020/optimizer.bin",
        "logs/train.log",
        "wandb/offline-run-1/files/config.yaml",
        "tensorboard/events.out.tfevents.123",
        "metrics.jsonl",
        "samples/step-000100.png",
        "wandb_run_id.txt",
        ".git/config",
        "samples/final.png",
        "config.json",
    ]
    for rel in junk:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")


def test_push_uploads_pipeline_card_config_and_final_grid_only(tmp_path):
    out = tmp_path / "lion-digits"
    write_run_folder(out)
    cfg = make_cfg(tmp_path, hub_token=FAKE_TOKEN)
    card = hub.build_model_card(make_run(cfg), repo_id="alice/lion-digits")
    api = FakeApi()
    url = hub.push_run(out, "alice/lion-digits", card, token=FAKE_TOKEN, api=api)

    assert url == "https://huggingface.co/alice/lion-digits"
    assert sorted(api.uploaded) == [
        "README.md",
        "config.json",
        "model_index.json",
        "samples/final.png",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(api.uploaded) == hub.files_to_upload(out)
    (kwargs,) = [kw for name, kw in api.calls if name == "upload_folder"]
    assert kwargs["repo_id"] == "alice/lion-digits" and kwargs["token"] == FAKE_TOKEN
    assert ModelCard.load(out / "README.md").data.library_name == "diffusers"


def test_push_sends_the_trainers_final_grid_but_not_earlier_ones(tmp_path):
    out = tmp_path / "run"
    write_run_folder(out)
    for name in ("step_000002.png", "step_000004.png"):
        (out / "samples" / name).write_text("png")
    run = make_run(make_cfg(tmp_path), sample_grid="samples/step_000004.png")
    api = FakeApi()
    hub.push_run(out, "alice/run", hub.build_model_card(run), api=api, sample_grid=run["sample_grid"])
    assert "samples/step_000004.png" in api.uploaded and "samples/step_000002.png" not in api.uploaded
    assert "checkpoints/checkpoint-000010/model.safetensors" not in api.uploaded


def test_push_refuses_a_file_holding_the_token(tmp_path):
    out = tmp_path / "run"
    write_run_folder(out)
    (out / "config.json").write_text(json.dumps({"hub_token": FAKE_TOKEN}))
    api = FakeApi()
    with pytest.raises(UserError, match="contains your Hub token"):
        hub.push_run(
            out, "alice/run", hub.build_model_card(make_run(make_cfg(tmp_path))), token=FAKE_TOKEN, api=api
        )
    assert api.calls == []


def test_push_without_pipeline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model_index.json is missing"):
        hub.push_run(tmp_path, "a/b", hub.build_model_card(make_run(make_cfg(tmp_path))), api=FakeApi())


def test_failed_upload_names_the_push_command_and_never_the_token(tmp_path):
    out = tmp_path / "my run"
    write_run_folder(out)

    class FailingUpload(FakeApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError(f"503 while sending with {FAKE_TOKEN}\nretries exhausted")

    card = hub.build_model_card(make_run(make_cfg(tmp_path)))
    with pytest.raises(UserError) as info:
        hub.push_run(out, "alice/x", card, token=FAKE_TOKEN, api=FailingUpload(), private=True)
    message = str(info.value)
    assert message.endswith(f"publish it with: diffusers-optim push '{out.resolve()}' --hub_model_id alice/x "
                            "--hub_private_repo")
    assert FAKE_TOKEN not in message and "\n" not in message
