"""Two real processes (`accelerate launch --multi_gpu --num_processes 2` on gloo): start-up without races,
stops by signal that every process agrees on (issue 16), through each launcher README names (none, accelerate's
one-process launcher, torch elastic on one machine and on two), and resumes at another process count."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_optim import cli, rundir
from tests.conftest import TINY_FLAGS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_run_folder import hashes, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT = 300
LAUNCH_TIMEOUT = 150  # one launch of the 10-stop test takes ~15 s idle, ~40 s on a loaded machine


def free_port() -> int:
    """A free TCP port for the rendezvous, so tests running side by side never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: Path, *args: str) -> list[str]:
    """The command a user types to train on two CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), *args]


def two_process_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}


def test_two_processes_start_20_times_and_agree_on_every_start_up_check(offline_env, tmp_path):
    """Start-up checks raced by two processes give both the same verdict, decided by the main one; then 20 real
    Trainer starts (start, one step, one checkpoint) back to back in two processes, with no failure. In between,
    the stop agreement: a signal or a divergence seen by one process is agreed by both."""
    n = 20
    flags = [*TINY_FLAGS, "--max_train_steps", "2"]
    proc = subprocess.run(launch_command(HERE / "two_process_startup.py", str(tmp_path), str(n), *flags),
                          env=two_process_env(offline_env), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert len(main["calls"]) == n + 2 and other["calls"] == []  # only the main process touched the folders
    assert [c.get("result") for c in main["checks"]] == [c.get("result") for c in other["checks"]]
    assert all(c == {"result": "None"} for c in main["checks"][:n])  # fresh folders: no checkpoint, no error
    for rank, record in ((0, main), (1, other)):
        held, unwritable = record["checks"][n:]
        assert "already holds a run (metrics.jsonl)" in held["error"]
        assert unwritable["error"].startswith("cannot write to output directory")
        assert held["quiet"] is unwritable["quiet"] is (rank == 1)  # the error is printed once, by the main process
    # a stop seen by one process only is agreed by both, so both stop after the same step
    assert main["agreed"] == other["agreed"] == [None, ["SIGTERM", False], ["", True]]
    assert [s.get("error") for s in main["starts"] + other["starts"]] == [None] * (2 * n)
    assert [s["result"] for s in main["starts"] + other["starts"]] == ["1"] * (2 * n)
    for i in range(n // 2):
        assert [p.name for p in (tmp_path / f"start-{i}" / "checkpoints").iterdir()] == ["checkpoint-000001"]
        assert json.loads((tmp_path / f"start-{i}" / "config.json").read_text())["config"]["overwrite_output_dir"]


# (step, where inside it, signal, sending process, target): 5 SIGINT and 5 SIGTERM to the launcher's process group
# (as Ctrl-C in a terminal) or to every process (as Slurm), from either process, at three points inside a step.
INTERRUPTIONS = [
    (0, "forward", "SIGINT", 0, "group"),
    (1, "backward", "SIGTERM", 1, "group"),
    (2, "optimizer", "SIGINT", 1, "all"),
    (3, "forward", "SIGTERM", 0, "all"),
    (4, "backward", "SIGINT", 0, "group"),
    (5, "optimizer", "SIGTERM", 1, "group"),
    (6, "forward", "SIGINT", 1, "group"),
    (7, "backward", "SIGTERM", 0, "all"),
    (8, "optimizer", "SIGINT", 0, "all"),
    (9, "optimizer", "SIGTERM", 1, "group"),
]
STEPS = 12


def run_two_processes(flags: list[str], env: dict[str, str], stop_at: str | None = None,
                      log: Path | None = None) -> subprocess.CompletedProcess:
    """The training script on two processes; with stop_at, through signal_at.py (a signal inside a step)."""
    script, extra = ROOT / "train_scripts" / "train_unconditional.py", {}
    if stop_at is not None:
        script, extra = HERE / "signal_at.py", {"STOP_AT": stop_at, "STOP_LOG": str(log)}
    # PYTHONFAULTHANDLER: a worker that gets SIGABRT prints every thread's Python stack first (see below)
    extra["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(launch_command(script, *flags), env={**two_process_env(env), **extra}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        # a hang (seen once in many runs: a completed run's launch that never exited): say where each worker is
        signal_workers(proc.pid, signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the launch hung for {LAUNCH_TIMEOUT} s; the workers' stacks at SIGABRT:\n{stderr[-8000:]}")
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def signal_workers(pid: int, signum: int) -> None:
    """Send signum to every process under a launcher."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers if any is still there (the workers run in sessions of their own)."""
    import psutil

    try:
        launcher = psutil.Process(pid)
        processes = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} differ"


def losses(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in records]


@pytest.mark.slow
def test_sigint_and_sigterm_inside_a_step_stop_both_processes_with_one_checkpoint_and_resume_exactly(
        offline_env, tmp_path):
    """10 stops (5 SIGINT, 5 SIGTERM) of one 2-process run, each resumed: every stop ends both processes within
    seconds with status 130, one line, and one checkpoint holding the weights of its step; the run then ends
    bit-identical to an uninterrupted 2-process run."""
    common = [*TINY_FLAGS, "--max_train_steps", str(STEPS), "--logging_steps", "1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    proc = run_two_processes([*common, "--checkpointing_steps", "1", "--output_dir", str(straight)], offline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    flags = [*common, "--checkpointing_steps", "0", "--output_dir", str(out)]
    for i, (step, where, signame, rank, target) in enumerate(INTERRUPTIONS):
        log = tmp_path / f"log-{i}"
        log.mkdir()
        resume = ["--resume_from_checkpoint", "latest"] if i else []
        proc = run_two_processes([*flags, *resume], offline_env, f"{rank}:{step}:{where}:{signame}:{target}", log)
        context = f"stop {i} ({signame} {target} in the {where} of step {step})\n{proc.stderr[-4000:]}"
        missing = [p.name for p in (log / "signal.json", log / "exit-0.json", log / "exit-1.json") if not p.is_file()]
        assert not missing, f"{context}\nnot written: {missing} (a process died before its exit, see above)"
        sent = json.loads((log / "signal.json").read_text())["time"]
        exits = [json.loads((log / f"exit-{r}.json").read_text()) for r in (0, 1)]
        assert [e["code"] for e in exits] == [130, 130], context
        assert max(e["time"] for e in exits) - sent < 10, context  # the step in progress, one save, out
        lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted (")]
        assert lines == [f"interrupted ({signame}) after step {step + 1}: checkpoint saved in {out}; "
                         "continue with --resume_from_checkpoint latest"], context
        assert "[rank" not in proc.stderr, context  # no worker traceback
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == [f"checkpoint-{k:06d}" for k in range(1, step + 2)], context  # one new checkpoint
        name = f"checkpoint-{step + 1:06d}"  # the label matches the weights: those of the straight run's step
        assert_same_weights(out / "checkpoints" / name / "model.safetensors",
                            straight / "checkpoints" / name / "model.safetensors")

    proc = run_two_processes([*flags, "--resume_from_checkpoint", "latest"], offline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_weights(out / "unet" / "diffusion_pytorch_model.safetensors",
                        straight / "unet" / "diffusion_pytorch_model.safetensors")
    assert losses(out) == losses(straight) and len(losses(out)) == STEPS


ONE_PROCESS_LAUNCHERS = {
    "no launcher": [sys.executable],
    # README's single-process command; accelerate 1.16+ answers Ctrl-C with a SIGTERM to its worker's process tree
    "accelerate launch, one process": [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
                                       "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                       "--dynamo_backend", "no"],
}


def run_one_process(launcher: list[str], flags: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """The real script, through signal_at.py, in a session of its own: its process group is the terminal's."""
    proc = subprocess.Popen([*launcher, str(HERE / "signal_at.py"), *flags], cwd=ROOT, text=True,
                            env={**env, "PYTHONPATH": str(ROOT), "STOP_LOG": str(log)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_under_each_one_process_launcher_saves_the_step_and_resumes_exactly(offline_env, tmp_path):
    """Ctrl-C (a real SIGINT to the process group, as a terminal sends it) with no launcher and under `accelerate
    launch` with one process, on image-folder data decoded by a DataLoader worker: one checkpoint of the interrupted
    step, status 130, and the resumed run ends bit-identical to one never stopped. (Two processes: the test above.)
    Under accelerate's launcher the worker got SIGTERM right after the SIGINT and exited without a checkpoint, and
    its data worker, killed by that SIGTERM, crashed the step."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(32):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"img{i:03d}.png")
    common = [*TINY_FLAGS, "--resolution", "8", "--train_data_dir", str(images), "--dataloader_num_workers", "1",
              "--max_train_steps", "6", "--logging_steps", "1", "--checkpointing_steps", "0"]
    from diffusers_optim import cli

    straight = tmp_path / "straight"  # trained here: only the stop needs a launcher
    assert cli.main(["train", *common, "--output_dir", str(straight)]) == 0

    for i, (name, launcher) in enumerate(ONE_PROCESS_LAUNCHERS.items()):
        out, log = tmp_path / f"run-{i}", tmp_path / f"log-{i}"
        log.mkdir()
        env = {**offline_env, "STOP_AT": "0:2:forward:SIGINT:group"}  # inside step 3
        proc = run_one_process(launcher, [*common, "--output_dir", str(out)], env, log)
        context = f"{name}\n{proc.stderr[-4000:]}"
        assert (log / "signal.json").is_file(), context
        assert proc.returncode == 130, context
        assert json.loads((log / "exit-0.json").read_text())["code"] == 130, context
        assert "again: exiting now" not in proc.stderr and "Traceback" not in proc.stderr, context
        lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted (")]
        assert lines == [f"interrupted (SIGINT) after step 3: checkpoint saved in {out}; "
                         "continue with --resume_from_checkpoint latest"], context
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000003"], context

        resume = [*common, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
        assert cli.main(["train", *resume]) == 0, name  # resumed here, as above
        assert_same_weights(out / "unet" / "diffusion_pytorch_model.safetensors",
                            straight / "unet" / "diffusion_pytorch_model.safetensors")
        assert losses(out) == losses(straight) and len(losses(out)) == 6, name


# Two torch elastic agents on one host cost ~60 CPU-s, and in one clean-clone suite the resume launch never returned
# (the hang seen once before in a 2-process launch); the one-machine path it shares (TORCHELASTIC_RUN_ID, the
# agreement) is the 10-stop test's. Run it with TWO_MACHINE_TEST=1 (it passed alone and in one earlier suite).
two_machines_opt_in = pytest.mark.skipif(
    os.environ.get("TWO_MACHINE_TEST") != "1",
    reason="two launchers on one host: ~60 CPU-s and a hang seen once in a full suite; TWO_MACHINE_TEST=1 runs it")


@two_machines_opt_in
@pytest.mark.slow
def test_ctrl_c_on_one_machine_of_two_stops_both_after_one_step_and_resumes_exactly(offline_env, tmp_path):
    """Two machines (two launchers on this host, one process each, static rendezvous, as two_machines.yaml): Ctrl-C
    in the first machine's terminal stops both after the same step with one checkpoint, and the resumed run ends
    bit-identical to a one-machine 2-process run. The other machine's launcher reports its worker's status 130 as a
    ChildFailedError (torch elastic's own report, exit 1)."""
    common = [*TINY_FLAGS, "--max_train_steps", "6", "--logging_steps", "1"]
    straight, out, log = tmp_path / "straight", tmp_path / "run", tmp_path / "log"
    log.mkdir()
    proc = run_two_processes([*common, "--output_dir", str(straight)], offline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def two_machines(*extra: str, stop_at: str = "0:99:forward:SIGINT:group") -> list[subprocess.CompletedProcess]:
        port = str(free_port())
        env = {**two_process_env(offline_env), "STOP_AT": stop_at, "STOP_LOG": str(log)}
        launchers = [subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "--rdzv_backend", "static", "--same_network", "--mixed_precision", "no",
             "--dynamo_backend", "no", str(HERE / "signal_at.py"), *common, "--output_dir", str(out), *extra],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank in (0, 1)]
        try:
            outputs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in launchers]
            return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(launchers, outputs)]
        finally:
            for p in launchers:
                kill_tree(p.pid)

    first, second = two_machines(stop_at="0:2:forward:SIGINT:group")  # machine 0's rank 0, inside step 3
    context = f"{first.stderr[-3000:]}\n--- machine 1 ---\n{second.stderr[-3000:]}"
    assert [json.loads((log / f"exit-{r}.json").read_text())["code"] for r in (0, 1)] == [130, 130], context
    assert first.returncode == 130 and second.returncode == 1, context
    lines = [line for line in first.stderr.splitlines() if line.startswith("interrupted (")]
    assert lines == [f"interrupted (SIGINT) after step 3: checkpoint saved in {out}; "
                     "continue with --resume_from_checkpoint latest"], context
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000003"], context

    resumed = two_machines("--resume_from_checkpoint", "latest")
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert_same_weights(out / "unet" / "diffusion_pytorch_model.safetensors",
                        straight / "unet" / "diffusion_pytorch_model.safetensors")
    assert losses(out) == losses(straight) and len(losses(out)) == 6


def assert_same_run_to_rounding(out: Path, straight: Path) -> None:
    """The same losses and weights as the unbroken run, up to the float rounding of another summation order."""
    def values(run: Path) -> list:  # the steps and every loss logged (approx compares no None)
        return [v for row in losses(run) for v in row if v is not None]

    assert values(out) == pytest.approx(values(straight), rel=1e-5) and len(values(out)) == len(values(straight))
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_a_new_process_count_continues_at_the_same_global_batch_and_refuses_another(offline_env, tmp_path, capsys):
    """Checkpoints at step 2 of a 4-step run by 2 processes at batch 4 and by 1 process at batch 8 (global batch 8
    both), resumed at the other process count. The same per-process batch halves or doubles the global batch: one
    error line naming both and the --train_batch_size that continues, not a byte of the run changed (2 x 4 resumed by
    1 process at batch 4 used to train on at global batch 4). The same global batch continues the same experiment
    and ends as the unbroken run, to float rounding (the all-reduce sums in another order)."""
    common = [*TINY_FLAGS, "--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "2"]
    resume = ["--resume_from_checkpoint", "latest"]
    straight, two, one = tmp_path / "straight", tmp_path / "two", tmp_path / "one"
    assert cli.main(["train", *common, "--output_dir", str(straight)]) == 0  # 1 process x 8, never moved
    assert cli.main(["train", *common, "--output_dir", str(one), "--stop_after_steps", "2"]) == 0
    proc = run_two_processes([*common, "--train_batch_size", "4", "--output_dir", str(two), "--stop_after_steps", "2"],
                             offline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    capsys.readouterr()

    before = hashes(two)  # 2 processes x 4 -> 1 process x 4
    code = cli.main(["train", *common, "--train_batch_size", "4", "--output_dir", str(two), *resume])
    one_line_error(capsys, code, "checkpoint-000002: checkpoint at global batch 8 (2 processes x 4); this launch "
                   "gives 4 (1 process x 4): pass --train_batch_size 8 to continue the same experiment, or pass "
                   "--allow_config_change to apply and record the change")
    assert hashes(two) == before
    before = hashes(one)  # 1 process x 8 -> 2 processes x 8: every process refuses, the main one says so
    proc = run_two_processes([*common, "--output_dir", str(one), *resume], offline_env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert "checkpoint at global batch 8 (1 process x 8); this launch gives 16 (2 processes x 8): pass " \
           "--train_batch_size 4 to continue" in errors[0]
    assert str(ROOT / "diffusers_optim") not in proc.stderr  # no traceback of ours (torch elastic adds its report)
    assert hashes(one) == before

    assert cli.main(["train", *common, "--output_dir", str(two), *resume]) == 0  # 2 processes x 4 -> 1 x 8
    proc = run_two_processes([*common, "--train_batch_size", "4", "--output_dir", str(one), *resume], offline_env)
    assert proc.returncode == 0, proc.stderr[-4000:]  # 1 process x 8 -> 2 x 4
    for out, processes, batch in ((two, 1, 8), (one, 2, 4)):
        assert_same_run_to_rounding(out, straight)
        assert [r["train/images_seen"] for r in rundir.read_metrics(out / rundir.METRICS)] == [8, 16, 24, 32]
        config = json.loads((out / rundir.CONFIG).read_text())
        assert (config["num_processes"], config["config"]["train_batch_size"], config["config_changes"]) == (
            processes, batch, [])
    assert losses(one)[:2] == losses(straight)[:2]  # one process at batch 8 up to the checkpoint: bit for bit
