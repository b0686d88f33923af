"""Per-sample noise: a pure function of (seed, step, micro-batch, global index), drawn on the device."""

from __future__ import annotations

import torch

from diffusers_optim.sampling import BatchStream, micro_batch_noise, sample_seed

SHAPE = (3, 8, 8)


def draw(first: int, batch: int, seed: int = 0, step: int = 3, micro: int = 1):
    return micro_batch_noise(seed, step, micro, first, batch, SHAPE, 1000, "cpu")


def test_ranks_see_the_slices_one_process_sees_at_the_global_batch():
    noise, t = draw(0, 8)
    for rank in range(4):  # 4 processes at batch 2 = 1 process at batch 8
        n_r, t_r = draw(rank * 2, 2)
        assert torch.equal(n_r, noise[rank * 2:rank * 2 + 2]) and torch.equal(t_r, t[rank * 2:rank * 2 + 2])


def global_micro_batches(processes: int, batch: int, num: int, start: int = 0, num_items: int = 45) -> list[list]:
    """The items of `num` global micro-batches: every rank's share, in rank order."""
    streams = [iter(BatchStream(num_items, batch, processes, rank, seed=3, start=start)) for rank in range(processes)]
    return [[item for stream in streams for item in next(stream)] for _ in range(num)]


def test_data_order_is_the_same_at_any_process_count_in_every_epoch_and_after_a_resume():
    """45 items at batch 4 are 11 per-process batches an epoch, which 2 processes do not split: the epoch must end
    on a whole global micro-batch, or from the second epoch on 2 processes x 4 read other images (and augmentation
    seeds) than 1 process x 8 (they did, from micro-batch 5)."""
    one = global_micro_batches(1, 8, 20)  # 5 micro-batches an epoch: 4 epochs
    assert global_micro_batches(2, 4, 20) == global_micro_batches(4, 2, 20) == one
    assert global_micro_batches(2, 4, 9, start=11) == one[11:]  # resumed mid-epoch at another process count
    assert len({i for i, _ in one[5]}) == 8 and {i for i, _ in one[0]} != {i for i, _ in one[5]}


def test_every_coordinate_of_the_key_changes_the_draw():
    base = draw(0, 4)
    for other in (draw(0, 4, seed=1), draw(0, 4, step=4), draw(0, 4, micro=2), draw(1, 4)):
        assert not torch.equal(base[0], other[0])
    assert len({sample_seed(s, st, m, i) for s in range(3) for st in range(3) for m in range(3) for i in range(3)}) == 81


def test_noise_is_standard_normal_and_timesteps_cover_the_range():
    noise, t = micro_batch_noise(0, 0, 0, 0, 4000, (1, 4, 4), 1000, "cpu")
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 250, minlength=4).float()  # 1000 per quarter expected; sd ~27
    assert (counts - 1000).abs().max() < 150
    # distinct samples are uncorrelated (a seed collision or shared stream would show up here)
    flat = micro_batch_noise(0, 0, 0, 0, 200, (1, 16, 16), 1000, "cpu")[0].flatten(1)
    corr = torch.corrcoef(flat)  # 256 values per sample: chance correlations stay under ~0.3
    assert corr.fill_diagonal_(0).abs().max() < 0.5


def test_dtype_and_device_are_honoured():
    noise, t = micro_batch_noise(0, 0, 0, 0, 2, SHAPE, 10, torch.device("cpu"), torch.bfloat16)
    assert noise.dtype == torch.bfloat16 and t.dtype == torch.long and noise.shape == (2, *SHAPE)


def test_noise_benchmark_runs_and_reports_both_schemes():
    """Smoke run of benchmarks/bench_noise.py so it does not rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_noise.py"
    out = subprocess.run([sys.executable, str(script), "--worlds", "1", "4", "--local_batch", "2", "--resolution",
                          "8", "--repeats", "1", "--json"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert set(report["ms_per_micro_batch"]) == {"global", "per-sample"}
    assert all(r > 0 for r in report["ratio_4_vs_1"].values())
