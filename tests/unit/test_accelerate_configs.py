"""The launch configs load with Accelerate's own loader, and the CPU one really starts two connected processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "accelerate_configs"

EXPECTED = {
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, "no", True),
    "single_gpu.yaml": (DistributedType.NO, 1, "no", False),
    "multi_gpu_fp16.yaml": (DistributedType.MULTI_GPU, 2, "fp16", False),
    "multi_gpu_bf16.yaml": (DistributedType.MULTI_GPU, 2, "bf16", False),
    "two_machines.yaml": (DistributedType.MULTI_GPU, 16, "bf16", False),
    "fsdp.yaml": (DistributedType.FSDP, 2, "bf16", False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, "bf16", False),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes, mixed_precision, use_cpu = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == mixed_precision
    assert config.use_cpu is use_cpu


def test_two_machines_has_documented_placeholders():
    config = load_config_from_file(str(CONFIGS / "two_machines.yaml"))
    assert (config.num_machines, config.machine_rank, config.main_process_port) == (2, 0, 29500)
    assert config.main_process_ip
    text = (CONFIGS / "two_machines.yaml").read_text()
    assert "machine_rank" in text and "placeholder" in text


def test_sharded_configs():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    ds = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    assert ds["zero_stage"] == 2
    assert "gradient_accumulation_steps" not in ds  # the script's flag must win


WORLD_SCRIPT = """
import torch
from accelerate import Accelerator
accelerator = Accelerator()
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
print(f"rank={accelerator.process_index} world={accelerator.num_processes} "
      f"type={accelerator.distributed_type.value} sum={total.item():.0f}", flush=True)
# as the trainer does: leaving with gloo's threads alive aborts a rank ("terminate called without an active exception")
accelerator.end_training()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cpu_config_launches_two_connected_processes(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(WORLD_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),  # the file's 29500 may be taken by a parallel test run
        str(script),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two processes share stdout, so their lines can interleave: match the records, not the lines
    records = sorted(re.findall(r"rank=\d+ world=\d+ type=\w+ sum=\d+", proc.stdout))
    assert records == ["rank=0 world=2 type=MULTI_CPU sum=3", "rank=1 world=2 type=MULTI_CPU sum=3"]
