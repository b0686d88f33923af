"""Per-rank cost of drawing a micro-batch's noise and timesteps, at world sizes 1, 8 and 64 (issue 13).

Each rank trains on the same LOCAL batch; what changes with the world size is what it must draw. "global" is the
previous scheme (the whole global batch drawn on the CPU on every rank, this rank's slice kept), shown for
contrast; "per-sample" is `diffusers_optim.sampling.micro_batch_noise` (only this rank's samples, on the device).
The world sizes of a variant take turns repeat by repeat (ABBA), so the machine's load hits them alike.
Always exits 0.

    python benchmarks/bench_noise.py                      # local batch 16, 3x64x64, worlds 1 8 64
    python benchmarks/bench_noise.py --device cuda --resolution 256 --local_batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffusers_optim.sampling import micro_batch_noise


def global_draw(step: int, world: int, rank: int, b: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous scheme, kept here as the reference: the global batch on the CPU, then this rank's slice."""
    g = torch.Generator(device="cpu").manual_seed(step)
    noise = torch.randn((world * b, *shape), generator=g)[rank * b:(rank + 1) * b]
    t = torch.randint(0, 1000, (world * b,), generator=g)[rank * b:(rank + 1) * b]
    return noise.to(device), t.to(device)


def per_sample(step: int, world: int, rank: int, b: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    return micro_batch_noise(0, step, 0, rank * b, b, shape, 1000, device)


def timed(fn, *args, device) -> float:
    start = time.perf_counter()
    fn(*args, device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--local_batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = (args.channels, args.resolution, args.resolution)
    variants = {"global": global_draw, "per-sample": per_sample}
    times = {(v, w): [] for v in variants for w in args.worlds}
    # The ratio that matters is between world sizes of one variant, so those take turns (ABBA); the variants run
    # one after the other, since the global draw at world 64 allocates hundreds of MB and would evict the caches
    # of whatever ran next to it.
    for v in variants:
        for r in range(args.repeats + 2):  # the first two rounds warm up and are dropped
            for w in (args.worlds if r % 2 == 0 else list(reversed(args.worlds))):
                t = timed(variants[v], r, w, w - 1, args.local_batch, shape, device=args.device)
                if r >= 2:
                    times[(v, w)].append(t)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {v: {w: round(median[(v, w)], 3) for w in args.worlds} for v in variants}
    first, last = args.worlds[0], args.worlds[-1]
    ratios = {v: round(median[(v, last)] / median[(v, first)], 3) for v in variants}
    if args.json:
        print(json.dumps({"ms_per_micro_batch": result, f"ratio_{last}_vs_{first}": ratios, "args": vars(args)}))
        return
    print(f"noise + timesteps for one rank's micro-batch: local batch {args.local_batch} x {shape}, {args.device}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'world':>6} " + " ".join(f"{v + ' ms':>14}" for v in variants))
    for w in args.worlds:
        print(f"{w:>6} " + " ".join(f"{median[(v, w)]:>14.3f}" for v in variants))
    print(f"ratio world {last} / world {first}: " + ", ".join(f"{v} {ratios[v]:.2f}" for v in variants))


if __name__ == "__main__":
    main()
