"""A tiny real comparison through the CLI: two optimizers, every report file, numbers that match the runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_optim.report.style import sig

pytestmark = pytest.mark.slow

TRAIN_FLAGS = [
    "--max_train_steps", "6", "--resolution", "8", "--train_batch_size", "8", "--ddpm_num_steps", "100",
    "--num_validation_images", "8", "--validation_steps", "3", "--logging_steps", "3", "--lr_warmup_steps", "1",
    "--sample_steps", "0", "--num_samples", "4", "--num_inference_steps", "2", "--num_eval_samples", "16",
    "--report_to", "none",
]  # fmt: skip
PROBES = ["--grad_probe_steps", "3"]  # the gradient-probe section of the report (end-to-end test only)


OPTIMIZERS = ["--optimizers", "adamw:lr=1e-3", "sgd:lr=0.05,momentum=0.9", "--seeds", "0"]
RUNS = ("adamw-lr0.001-s0", "sgd-lr0.05-s0")


def compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The CLI with stdout a pipe (as in CI or `> log`): progress comes as plain lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "diffusers_optim.cli", "compare", *OPTIMIZERS, "--output_dir", str(out),
           *extra, *TRAIN_FLAGS]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def check_progress_lines(stdout: str, out: Path) -> None:
    """Plain progress: where the logs go, periodic lines per run and overall, then the compact ranking."""
    lines = stdout.splitlines()
    assert f"each run's full output goes to {out / 'logs' / '<run>.log'}" in stdout
    for run in RUNS:
        assert f"started {run} (log: {out / 'logs' / (run + '.log')})" in lines
        periodic = [line for line in lines if re.match(rf"\[[\dms. ]+\] {re.escape(run)}: step \d+/6, ", line)]
        # e.g. "[41.2 s] sgd-lr0.05-s0: step 6/6, loss 0.9, 35 img/s, ETA 0.0 s, final sampling"
        assert any(re.search(r"step \d/6, loss [\d.]+, \d+ img/s, ETA ", line) for line in periodic), stdout[-3000:]
        assert any(re.match(rf"finished {re.escape(run)} in ", line) for line in lines)
    assert any(re.match(r"\[.*\] runs: [012]/2 runs finished, [012] running, steps \d+/(12|\?), ETA ", line)
               for line in lines)
    # the compact ranking: two arms, their primary metric, and the report's path, no 17-column table
    summary = json.loads((out / "summary.json").read_text())
    metric = summary["rank_by"]
    tail = stdout[stdout.index(f"ranking by final {metric}"):].splitlines()
    assert len(tail) == 4 and all(len(line) < 100 for line in tail), tail
    for row, line in zip(summary["arms"], tail[1:3]):
        assert line.split()[:3] == [str(row["rank"]), row["arm"], sig(row[metric])], line
    assert tail[3] == f"report: {out / 'report.html'}"
    assert "| rank |" not in stdout


def last(path: Path, key: str) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r[key] for r in records if key in r][-1]


def test_tiny_comparison_end_to_end(tmp_path: Path):
    out = tmp_path / "cmp"
    result = compare(out, "--num_parallel", "2", "--progress_every", "0.2", *PROBES)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in ["plan.json", "summary.json", "summary.csv", "report.html", "report.md"]:
        assert (out / name).is_file(), name
    check_progress_lines(result.stdout, out)

    summary = json.loads((out / "summary.json").read_text())
    assert {r["status"] for r in summary["runs"]} == {"complete"}
    html = (out / "report.html").read_text()
    for row in summary["runs"]:
        metrics = out / "runs" / row["run"] / "metrics.jsonl"
        for key in ["val/loss", "train/loss", "val_t/00-24", "loss_t/75-99"]:
            assert row[key] == pytest.approx(last(metrics, key)), key
        opt = next(o for o in summary["arms"] if o["arm"] == row["arm"])
        assert opt["val/loss"] == pytest.approx(row["val/loss"])  # one seed: the mean is the run
        assert f">{sig(row['val/loss'])}<" in html  # rounded to significant digits for people
    # four figures, four of the gradient probes, and both final sample grids
    assert html.count("data:image/png;base64,") == 10
    md = (out / "report.md").read_text()
    assert md.count("](report_files/") == 10 and "diffusers-optim compare --optimizers" in md
    for text in (html, md):
        assert "Gradients by timestep bucket" in text and "cosine between bucket gradients" in text
    for name in ("grad_t_norm", "grad_t_cos_matrix", "grad_t_update_cos", "grad_t_momentum_cos"):
        assert (out / "report_files" / f"{name}.png").stat().st_size > 1000, name

    # the rerun reuses both finished runs: no trainer is started, nothing in the run folders changes
    logs = {p: p.read_text() for p in (out / "logs").glob("*.log")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run_summary.json")}
    again = compare(out, *PROBES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing complete run") == 2
    assert {p: p.read_text() for p in logs} == logs and len(stamps) == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def run_in_pty(cmd: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run cmd with a pseudo-terminal as stdin/stdout/stderr (what a person's shell gives it); returns its output."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_live_view_on_a_terminal(tmp_path: Path):
    out = tmp_path / "cmp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TERM": "xterm-256color",
           "COLUMNS": "110", "LINES": "40"}
    env.pop("NO_COLOR", None)
    cmd = [sys.executable, "-m", "diffusers_optim.cli", "compare", *OPTIMIZERS, "--output_dir", str(out),
           "--num_parallel", "2", "--progress_every", "0.2", *TRAIN_FLAGS]
    code, screen = run_in_pty(cmd, env)
    assert code == 0, screen[-3000:]
    assert "\x1b[2K" in screen and "\x1b[1A" in screen  # lines erased and redrawn in place, not appended
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).replace("\r", "")
    assert re.search(r"run\s+step\s+loss\s+img/s\s+ETA\s+phase", text), text[-3000:]
    for run in RUNS:
        rows = re.findall(rf"^{re.escape(run)}\s+(\d)/6\s+(\S+)\s+(\S+)\s+(\S+)", text, re.MULTILINE)
        assert rows, text[-3000:]  # a live row: name, step/total, loss, img/s, ETA
        assert any(loss != "-" and ips.isdigit() for _, loss, ips, _ in rows), rows
    assert re.search(r"runs: [012]/2 runs finished, [012] running, steps \d+/(12|\?), ETA", text)
    metric = json.loads((out / "summary.json").read_text())["rank_by"]
    assert f"ranking by final {metric}" in text and f"report: {out / 'report.html'}" in text


def test_grid_values_reach_the_trainer_and_name_the_arms(tmp_path, monkeypatch):
    """The planned trainer commands run in this process (compare's launcher hook, as in test_readme_commands); the
    pool's own subprocess path is test_tiny_comparison_end_to_end's."""
    from test_readme_commands import in_process

    from diffusers_optim import compare

    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "grid"
    argv = ["--optimizers", "adamw:lr=1e-3", "--seeds", "0", "--grid", "max_grad_norm=0,0.01", "--rank_by", "val/loss",
            "--output_dir", str(out), *TRAIN_FLAGS]
    compare.run_comparison(compare.parse_comparison(argv), launcher=in_process)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(a["arm"] for a in summary["arms"]) == ["adamw max_grad_norm=0", "adamw max_grad_norm=0.01"]
    assert summary["rank_by"] == "val/loss"
    for arm in summary["arms"]:
        (run,) = [r for r in summary["runs"] if r["arm"] == arm["arm"]]
        config = json.loads((out / "runs" / run["run"] / "config.json").read_text())["config"]
        assert config["max_grad_norm"] == arm["settings"]["max_grad_norm"]
        # the value changed training: clipping off never clips, a 0.01 bound clips every step
        assert run["clipped_fraction_mean"] == (0.0 if config["max_grad_norm"] == 0 else 1.0)


def test_two_specs_of_one_optimizer_have_one_short_name_everywhere(tmp_path, monkeypatch):
    """Two adam specs differing in betas only: plan.json, the run folders, summary.json, report.md and the W&B
    grouping name each arm by the optimizer and its betas, never by every resolved argument. The CLI in this
    process, its planned trainer commands too (the pool's subprocess path is test_tiny_comparison_end_to_end's)."""
    from functools import partial

    from test_readme_commands import in_process

    from diffusers_optim import cli, compare, live, wandb_report

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(compare, "run_comparison", partial(compare.run_comparison, launcher=in_process))
    out = tmp_path / "betas"
    specs = ["adam:lr=1e-3,betas=(0.5,0.999)", "adam:lr=1e-3,betas=(0.9,0.999)"]
    assert cli.main(["compare", "--optimizers", *specs, "--seeds", "0", "--output_dir", str(out), *TRAIN_FLAGS]) == 0
    names = ["adam betas=(0.5,0.999)", "adam betas=(0.9,0.999)"]
    folders = ["adam-betas=0.5-0.999-lr0.001-s0", "adam-betas=0.9-0.999-lr0.001-s0"]

    plan = json.loads((out / "plan.json").read_text())
    assert [a["label"] for a in plan["arms"]] == names and [a["optimizer"] for a in plan["arms"]] == ["adam"] * 2
    assert [(r["arm"], r["optimizer"], r["path"]) for r in plan["runs"]] == [
        (name, "adam", f"runs/{folder}") for name, folder in zip(names, folders)]
    for name, folder in zip(names, folders):
        assert json.loads((out / "runs" / folder / "config.json").read_text())["config"]["arm_name"] == name
    assert wandb_report.arm_grouping(plan) == ["config.arm_name"]  # W&B: one line per arm, under its name

    summary = json.loads((out / "summary.json").read_text())
    assert sorted(a["arm"] for a in summary["arms"]) == names
    assert [(r["arm"], r["run"]) for r in summary["runs"]] == list(zip(names, folders))
    assert sorted(a["settings"]["betas"] for a in summary["arms"]) == [[0.5, 0.999], [0.9, 0.999]]
    ranking = live.final_lines(summary, out / "report.html").splitlines()[1:3]  # what the comparison prints last
    assert sorted(line.split("  ")[2].strip() for line in ranking) == names, ranking
    md = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    assert "optimizer_args=" not in md and "eps=" not in md and "weight_decay" not in md
    assert "betas=(0.5,0.999),eps" not in (out / "summary.csv").read_text()


def test_summarize_without_the_best_runs_metrics_ranks_it_from_its_run_summary(tmp_path, monkeypatch):
    """The best run's metrics.jsonl is deleted after a real comparison: `diffusers-optim summarize` still ranks it by
    the final values its run_summary.json holds, warns once naming the run and what is lost (its curves), and the
    report says so. A run whose values are truly gone is left out of the ranking with its reason, never ranked last."""
    from test_readme_commands import in_process

    from diffusers_optim import compare

    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "cmp"
    compare.run_comparison(compare.parse_comparison([*OPTIMIZERS, "--output_dir", str(out), *TRAIN_FLAGS]),
                           launcher=in_process)
    before = json.loads((out / "summary.json").read_text())
    metric, best = before["rank_by"], before["arms"][0]["arm"]
    (best_run,) = [r["run"] for r in before["runs"] if r["arm"] == best]
    (out / "runs" / best_run / "metrics.jsonl").unlink()

    def summarize() -> tuple[dict, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "diffusers_optim.cli", "summarize", str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "summary.json").read_text()), proc.stderr

    after, stderr = summarize()
    warnings = [line for line in stderr.splitlines() if best_run in line and "metrics.jsonl is missing" in line]
    assert len(warnings) == 1 and "curves are missing" in warnings[0], stderr
    assert [(a["arm"], a["rank"], a[metric]) for a in after["arms"]] == \
        [(a["arm"], a["rank"], a[metric]) for a in before["arms"]]
    row = next(r for r in after["runs"] if r["run"] == best_run)
    final = json.loads((out / "runs" / best_run / "run_summary.json").read_text())["final"]
    assert row["val/loss"] == final["val/loss"] and row["curves_missing"] == "metrics.jsonl is missing"
    assert row["target_step"] is None and row["unranked"] is None
    md = (out / "report.md").read_text()
    assert f"{best_run}: curves missing (metrics.jsonl is missing)" in md

    # the other run loses its run_summary.json too: nothing says it finished, so it is not ranked at all
    (other,) = [r["run"] for r in before["runs"] if r["arm"] != best]
    (out / "runs" / other / "run_summary.json").unlink()
    after, _ = summarize()
    assert [(a["arm"], a["rank"], a["unranked"]) for a in after["arms"]] == \
        [(best, 1, None), (before["arms"][1]["arm"], None, "run incomplete")]
    assert f"is not ranked on {metric}: run incomplete." in (out / "report.md").read_text()


def test_arms_that_differ_by_nothing_that_matters_resolve_no_win_and_get_no_pick(tmp_path, monkeypatch):
    """Two adam arms whose eps differs by 10% (1e-8 vs 1.1e-8: the runs differ in the 7th digit), 3 seeds, through
    the real CLI: the paired seeds make the tiny difference precise, which the report used to call a resolved win
    ("Pick ..."). Now nothing is resolved as a win, val/loss is resolved equivalent (inside its own standard error),
    and the recommendation names both arms instead of one."""
    from functools import partial

    from test_readme_commands import in_process

    from diffusers_optim import cli, compare

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(compare, "run_comparison", partial(compare.run_comparison, launcher=in_process))
    out = tmp_path / "eps"
    specs = ["adam:lr=1e-3,eps=1e-8", "adam:lr=1e-3,eps=1.1e-8"]
    assert cli.main(["compare", "--optimizers", *specs, "--seeds", "0", "1", "2", "--output_dir", str(out),
                     *TRAIN_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["statistics"]
    assert not stats["resolved_best"] and summary["arms"][1]["verdict"] == "equivalent"
    assert not any(c["resolved"] for c in summary["comparisons"])  # no key shows a win by a difference that matters
    val = next(c for c in summary["comparisons"] if c["metric"] == "val/loss")
    assert val["verdict"] == "equivalent" and abs(val["mean"]) < stats["min_effect"]["val/loss"]
    assert sum(stats["family"].values()) == pytest.approx(0.05)
    report = (out / "report.md").read_text()
    assert "No single pick on eval/fd" in report and "Pick adam" not in report
    assert "equivalent: within ±" in report and "equivalent on val/loss" in report
    # the W&B report states the same verdicts, word for word
    from diffusers_optim import wandb_report

    spec_path = tmp_path / "wandb_report.json"
    assert wandb_report.main(["--entity", "e", "--project", "p", "--comparison", str(out), "--dry-run",
                              str(spec_path)]) == 0
    spec = spec_path.read_text()
    first = report.split("## Recommendation\n\n", 1)[1].split("\n", 1)[0]
    assert first.startswith("No single pick") and json.dumps(first)[1:-1] in spec
