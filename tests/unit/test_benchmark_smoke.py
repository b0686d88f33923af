"""Smoke run of benchmarks/bench_trainer_overhead.py (a few tiny steps), so the benchmark does not rot."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from diffusers_optim.errors import UserError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trainer_overhead.py"
TINY = [
    "--presets",
    "tiny",
    "--resolution",
    "8",
    "--batch_size",
    "4",
    "--logging_steps",
    "2",
    "--repeats",
    "2",
    "--warmup_steps",
    "2",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trainer_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the benchmark sets it process-wide


def test_tiny_run_reports_both_throughputs_and_logs_through_the_trainer(bench, tmp_path, capsys):
    assert bench.main([*TINY, "--json", "--output_dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["threads"] == 1 and report["settings"]["block_steps"] == 1
    (result,) = report["results"]
    assert result["preset"] == "tiny" and len(result["repeats"]) == 2
    for key in (
        "bare_images_per_sec",
        "trainer_between_log_images_per_sec",
        "trainer_amortized_images_per_sec",
        "ratio_between_log",
        "ratio_amortized",
        "cpu_time_ratio_between_log",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    # The Trainer really logged: 2 warm-up + 2 blocks of 2 steps, a log step every 2 steps.
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all("train/grad_norm" in r and "train/update_ratio" in r for r in records)
    table = bench.format_table(report)
    assert "tiny" in table and "set_num_threads(1)" in table and "ratio" in table


def test_output_dir_holding_a_run_is_a_user_error(bench, tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        bench.main([*TINY, "--output_dir", str(tmp_path)])


def test_grad_probe_benchmark_reports_the_ratio_and_each_kind_of_steps_peak(tmp_path, capsys):
    path = SCRIPT.parent / "bench_grad_probes.py"
    spec = importlib.util.spec_from_file_location("bench_grad_probes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--presets", "tiny", "--resolution", "8", "--batch_size", "4", "--grad_probe_steps", "4",
            "--logging_steps", "2", "--repeats", "1", "--block_steps", "1", "--threads", "1",
            "--num_validation_images", "8", "--memory", "--memory_steps", "4", "--json"]
    assert module.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (throughput,) = report["throughput"]
    assert throughput["preset"] == "tiny" and throughput["ratio"] > 0 and len(throughput["repeats"]) == 1
    (memory,) = report["memory"]
    assert memory["other_peak_mb"] > 0 and memory["log_vs_other"] > 0 and memory["probe_vs_other"] > 0
    assert "ratio" in module.format_table(report)


def test_bench_ray_overhead_plans_the_same_comparison_both_ways(tmp_path):
    """bench_ray_overhead.py's two comparisons pass compare's own checks and differ only in the backend flags (its
    timed run needs a Ray cluster and 16 trainer processes: run by hand, see benchmarks/README.md)."""
    from diffusers_optim import compare

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install 'diffusers-optim[ray]' (the test extra has it)")
    spec = importlib.util.spec_from_file_location("bench_ray_overhead", SCRIPT.parent / "bench_ray_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--steps", "3"])
    local, ray = (compare.parse_comparison(module.comparison_argv(b, tmp_path / b, args)) for b in ("local", "ray"))
    assert (local.ray, local.num_parallel) == (None, 2)
    assert (ray.ray.cpus_per_run, ray.ray.address) == (1.0, None)
    assert len(local.arms) * len(local.seeds) == 8 and local.common == ray.common
    with pytest.raises(SystemExit):
        module.parse_args(["--rounds", "0"])


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_step_memory_benchmark_measures_each_kind_of_step_through_the_trainer(capsys):
    bench = load_benchmark("bench_log_step_memory")
    argv = ["--preset", "tiny", "--resolution", "8", "--batch_size", "4", "--logging_steps", "2", "--steps", "4",
            "--warmup_steps", "1", "--grad_probe_steps", "3", "--num_validation_images", "8", "--threads", "1",
            "--json"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["result"]
    # steps 2..5 measured: 2 and 4 log steps, 3 a probe step, 5 an ordinary one
    assert result["memory"] == "rss" and result["steps"] == {"other": 1, "log": 2, "probe": 1}
    assert result["other_peak_max_mb"] > 100  # a process with torch and diffusers loaded
    assert 0.5 < result["log_vs_other_max"] < 2 and math.isfinite(result["probe_vs_other_median"])
    assert "log steps" in bench.format_table(report) and report["settings"]["load_before"]


def test_gpu_throughput_without_cuda_measures_nothing_and_says_so(monkeypatch, capsys):
    bench = load_benchmark("gpu_throughput")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert capsys.readouterr().out.strip() == bench.NO_CUDA


def test_gpu_throughput_dry_run_times_the_trainer_against_the_bare_loop_in_a_child(capsys):
    bench = load_benchmark("gpu_throughput")
    assert bench.main(["--dry_run", "--precisions", "bf16", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert "error" not in result, result.get("error")
    assert result["config"]["precision"] == "bf16" and result["config"]["preset"] == "tiny"
    assert result["device"] == "cpu" and len(result["repeats"]) == 2
    for key in ("bare_s_per_step", "trainer_s_per_step", "s_per_step_ratio", "s_per_step_ratio_amortized"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert "bf16" in bench.format_table([result])
