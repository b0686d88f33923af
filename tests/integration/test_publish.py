"""Publishing a finished run later: a failed upload at the end names `diffusers-optim push`, which publishes the
run as the end of training would have, without training or rewriting anything.

No Hub here, so the account calls (whoami, create_repo) answer without network; the upload is the real
huggingface_hub client, whose network is off (HF_HUB_OFFLINE in the library): a real failed upload. The publish
then records the upload's only network calls (README validation, the commit) instead of sending them: everything
before them (allow/ignore patterns, the client's default ignores, the files read from disk) is the real client's.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from diffusers_optim import cli, hub, rundir
from tests.conftest import TINY_FLAGS

TOKEN = "hf_notarealtoken1234"
REPO = "alice/tiny-digits"
# What a model repository gets from a tiny run (4 images, one grid at the end): written out, not computed.
PUBLISHED = [
    "README.md",
    "config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]


class AccountOnly(HfApi):
    """The real client, except that the account answers without network: the Hub was reachable at the start."""

    created: list[str] = []

    def whoami(self, token=None, **kwargs):
        return {"name": "alice"}

    def create_repo(self, repo_id, **kwargs):
        AccountOnly.created.append(repo_id)
        return f"https://huggingface.co/{repo_id}"


class RecordingHub(AccountOnly):
    """... and the upload's network calls recorded instead of sent."""

    commits: list[dict] = []

    def _validate_yaml(self, content, **kwargs):
        assert content.startswith("---\n")  # the card's metadata block, which the Hub would check

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        RecordingHub.commits.append({"repo_id": repo_id, "files": files, "token": kwargs.get("token")})
        return SimpleNamespace(repo_url=f"https://huggingface.co/{repo_id}")


@pytest.fixture
def hub_account(offline_env, monkeypatch):
    """A Hub login (HF_TOKEN) and no offline flag for our own access check; the client's network stays off."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any real request fails at once
    # the client's single-commit path (the one it takes without hf_xet), so that the commit is one call to record
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(hub, "HfApi", AccountOnly)
    monkeypatch.setattr(AccountOnly, "created", [])
    monkeypatch.setattr(RecordingHub, "commits", [])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def grid_name(out: Path) -> str:
    return rundir.read_json(out / rundir.SUMMARY)["sample_grid"]


def test_a_failed_upload_names_the_one_command_that_publishes_the_run(tmp_path, hub_account, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = ["--output_dir", str(out), "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", REPO]
    code = cli.main(["train", *TINY_FLAGS, *flags])
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 2 and f"upload to {REPO} failed (OfflineModeIsEnabled" in line and TOKEN not in err
    command = line.split("publish it with: ", 1)[1]
    assert shlex.split(command) == ["diffusers-optim", "push", str(out.resolve()), "--hub_model_id", REPO]
    assert rundir.is_complete(out)  # the run itself finished
    before = snapshot(out)

    monkeypatch.setattr(hub, "HfApi", RecordingHub)  # the network is back
    assert cli.main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    (commit,) = RecordingHub.commits
    assert commit["repo_id"] == REPO and commit["token"] == TOKEN
    assert sorted(commit["files"]) == sorted([*PUBLISHED, grid_name(out)])
    assert commit["files"]["README.md"] == before["README.md"]  # the card the end of the run wrote
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in before["README.md"].decode()
    assert snapshot(out) == before  # nothing trained, nothing rewritten
    assert AccountOnly.created == [REPO, REPO]  # the repo is made sure of each time, never assumed


def test_resume_latest_with_push_to_hub_publishes_a_complete_run_without_training(
    tmp_path, hub_account, copy_finished_run, monkeypatch
):
    """The same command once more (a job script's rerun) after the upload failed: it pushes and trains nothing."""
    out = copy_finished_run(tmp_path / "run")
    before = snapshot(out)
    assert "README.md" not in before  # trained without --push_to_hub: no card yet
    monkeypatch.setattr(hub, "HfApi", RecordingHub)
    resume = ["--output_dir", str(out), "--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "2",
              "--resume_from_checkpoint", "latest", "--push_to_hub", "--hub_model_id", REPO]
    assert cli.main(["train", *TINY_FLAGS, *resume]) == 0
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "README.md"} == before  # only the card was added
    (commit,) = RecordingHub.commits
    assert sorted(commit["files"]) == sorted([*PUBLISHED, grid_name(out)])  # no checkpoints, logs or metrics
    card = out / "README.md"
    written = card.stat().st_mtime_ns
    assert cli.main(["train", *TINY_FLAGS, *resume]) == 0  # once more: the same card is not rewritten
    assert card.stat().st_mtime_ns == written and snapshot(out) == after and len(RecordingHub.commits) == 2


def test_push_refuses_an_unfinished_run_in_one_line(tmp_path, hub_account, copy_finished_run, capsys):
    out = copy_finished_run(tmp_path / "run")
    (out / rundir.SUMMARY).unlink()  # killed during the final save: checkpoints, no run_summary.json
    before = snapshot(out)
    code = cli.main(["push", str(out), "--hub_model_id", REPO])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and f"push: {out} is not a finished run" in line and "--resume_from_checkpoint latest" in line
    assert snapshot(out) == before and AccountOnly.created == [] and RecordingHub.commits == []


def test_push_offline_is_one_line(tmp_path, hub_account, copy_finished_run, capsys, monkeypatch):
    out = copy_finished_run(tmp_path / "run")
    before = snapshot(out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["push", str(out)])
    assert code == 2 and error_line(capsys.readouterr().err) == "error: push needs network, but HF_HUB_OFFLINE is set"
    assert snapshot(out) == before


def test_resuming_a_finished_run_without_checkpoints_names_the_push(tmp_path, hub_account, copy_finished_run, capsys):
    """A run trained with --checkpointing_steps 0 has nothing to resume: the refusal offers the publish, not only a
    retraining."""
    import shutil

    out = copy_finished_run(tmp_path / "run")
    shutil.rmtree(out / rundir.CHECKPOINTS)
    before = snapshot(out)
    code = cli.main(["train", *TINY_FLAGS, "--output_dir", str(out), "--max_train_steps", "4",
                     "--resume_from_checkpoint", "latest", "--push_to_hub", "--hub_model_id", REPO])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "is a finished run (4 steps) with no checkpoint to continue from" in line
    assert line.split("publish it with: ", 1)[1].startswith(f"{hub.push_command(out, REPO)}; ")
    assert snapshot(out) == before and AccountOnly.created == []
