"""Smoke run of benchmarks/bench_stop_agreement.py on one process (a few tiny steps), so it does not rot."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_stop_agreement.py"


def test_tiny_run_times_steps_and_the_agreement(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("bench_stop_agreement", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--resolution", "8", "--batch_size", "4", "--repeats", "2", "--block_steps", "2", "--calls", "20", "--json",
            "--output_dir", str(tmp_path / "run")]
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["processes"] == 1 and report["step_ms_with"] > 0 and report["step_ms_without"] > 0
    assert 0 <= report["agreed_us_alone"] < report["step_ms_without"] * 1e3  # one process: no collective at all
    assert (tmp_path / "run" / "config.json").is_file()  # a real Trainer ran
