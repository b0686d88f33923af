"""Smoke run of benchmarks/bench_vs_peer.py (three tiny steps per arm), so the benchmark does not rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_vs_peer.py"
# diffusers' example sits in the session's shared folder, beside the clone (CI copies it there too)
PEER = next((p for p in (ROOT.parent / "shared" / "peer" / "train_unconditional.py",
                         ROOT.parent.parent / "shared" / "peer" / "train_unconditional.py") if p.is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(PEER is None, reason="diffusers' train_unconditional.py is not beside the repository")
def test_bench_vs_peer_times_both_scripts(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--peer", str(PEER), "--arms", "peer", "ours", "--preset", "tiny",
         "--resolution", "8", "--batch_size", "4", "--steps", "3", "--steady_from", "1", "--json",
         "--work_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    for arm in ("peer", "ours"):
        r = report["results"][arm]
        assert r["cpu_s_per_step"] > 0 and r["wall_s_per_step"] > 0
        steps = (tmp_path / f"{arm}.steps.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in steps] == [1, 2, 3]  # the clock stopped each script at 3
    assert report["results"]["peer"]["cpu_ratio"] == 1.0


def test_bench_vs_peer_refuses_a_missing_peer(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--peer", str(tmp_path / "nope.py")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "no such file" in out.stderr
