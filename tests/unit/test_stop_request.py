"""StopRequest on one process: a signal only sets a flag, a second one exits at once, a forwarded copy does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from accelerate import PartialState

from diffusers_optim.distributed import Stop, StopRequest

ROOT = Path(__file__).resolve().parents[2]


def test_a_signal_sets_the_flag_and_the_loop_decides():
    request = StopRequest(PartialState())
    previous = signal.getsignal(signal.SIGTERM)
    assert request.agreed() is None
    assert request.agreed(diverged=True) == Stop(diverged=True)
    with request.listening():
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: no exception, the process goes on
        stop = request.agreed()
    assert stop == Stop(signum=signal.SIGTERM) and stop.signal_name == "SIGTERM"
    signal.signal(signal.SIGTERM, previous)  # (after a signal stop the late-copy handler stays: see below)
    with StopRequest(PartialState()).listening():
        pass
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored after a loop that was not signalled


def test_after_a_signal_stop_a_late_copy_is_ignored_and_a_later_signal_gets_the_previous_handler():
    """The launcher forwards a signal to one worker after another: on a busy machine a worker can agree on the
    stop (another process got it first), save and leave the loop before its own copy arrives."""
    program = textwrap.dedent("""
        import os, signal, time
        from accelerate import PartialState
        from diffusers_optim.distributed import REPEAT_WINDOW_S, StopRequest
        request = StopRequest(PartialState())
        with request.listening():
            os.kill(os.getpid(), signal.SIGINT)
            print("stop:", request.agreed().signal_name, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        print("late copy ignored", flush=True)
        time.sleep(REPEAT_WINDOW_S + 0.2)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            print("then Python's own handler", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stop: SIGINT\nlate copy ignored\nthen Python's own handler\n"


def test_under_a_launcher_a_signal_repeated_at_once_is_the_same_request(monkeypatch):
    """torch elastic forwards the signal a worker already got directly (Slurm signals every process)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    request = StopRequest(PartialState())
    request.handle(signal.SIGTERM, None)
    request.handle(signal.SIGTERM, None)  # within REPEAT_WINDOW_S: not a second request, no exit
    assert request.agreed() == Stop(signum=signal.SIGTERM)


def test_a_second_signal_exits_at_once_with_status_130(tmp_path):
    program = textwrap.dedent("""
        import os, signal
        from accelerate import PartialState
        from diffusers_optim.distributed import StopRequest
        request = StopRequest(PartialState())
        with request.listening():
            os.kill(os.getpid(), signal.SIGINT)
            print("first:", request.agreed().signal_name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            print("still running", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "first: SIGINT\n"
    assert proc.stderr.strip() == "SIGTERM again: exiting now, without a checkpoint"


def test_a_slow_checkpoint_under_accelerates_one_process_launcher_is_warned_about():
    """accelerate launch (one process) SIGKILLs its worker 5 s after Ctrl-C: a save that eats most of that is said."""
    from diffusers_optim.distributed import launcher, slow_save_warning

    assert slow_save_warning(4.0, "accelerate").startswith("saving a checkpoint took 4.0 s")
    assert "python SCRIPT FLAGS" in slow_save_warning(4.0, "accelerate")
    assert slow_save_warning(1.0, "accelerate") is None
    assert slow_save_warning(60.0, "torch elastic") is None  # its shutdown timeout is TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    assert slow_save_warning(60.0, None) is None
    assert launcher() is None  # pytest is no launcher


def test_every_way_of_starting_accelerates_launcher_is_recognised():
    from diffusers_optim.distributed import is_accelerate_launch

    py = "/usr/bin/python3"
    for argv in (["/venv/bin/python", "/venv/bin/accelerate", "launch", "train.py"],
                 ["/venv/bin/python", "/venv/bin/accelerate-launch", "train.py"],
                 [py, "-m", "accelerate.commands.launch", "train.py"],
                 [py, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "1", "t.py"]):
        assert is_accelerate_launch(argv), argv
    for argv in ([py, "-m", "pytest", "-k", "launch"], [py, "train.py", "launch"], ["/venv/bin/accelerate", "env"]):
        assert not is_accelerate_launch(argv), argv
