"""Shared sampling: each image's noise is its own and the chunks are the same at every process count."""

from __future__ import annotations

import torch

from diffusers_optim.models import build_noise_scheduler, build_unet
from diffusers_optim.sampling import generate_images, rank_chunks


def test_the_processes_chunks_are_one_process_chunks_dealt_round_robin():
    one = rank_chunks(10, 3, 0, 1)
    assert one == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    for world in (2, 3, 4, 7):
        shares = [rank_chunks(10, 3, rank, world) for rank in range(world)]
        assert sorted((c for share in shares for c in share), key=lambda c: c.start) == one
        assert [c.start // 3 % world for c in shares[world - 1]] == [world - 1] * len(shares[world - 1])


def test_an_image_is_the_same_in_any_batch_and_seeds_differ():
    unet, scheduler = build_unet("tiny", 8, 1, 0).eval(), build_noise_scheduler(50, "linear", "epsilon")

    def sample(n: int, batch_size: int, seed: int = 7) -> torch.Tensor:
        return generate_images(unet, scheduler, n, seed, 3, batch_size=batch_size)

    whole = sample(5, 5)
    assert whole.shape == (5, 1, 8, 8) and whole.min() >= -1 and whole.max() <= 1
    # one batch of 5 vs batches of 2, 2, 1: the same noise per image (the start and every DDPM step's)
    torch.testing.assert_close(sample(5, 2), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample(2, 1), whole[:2], rtol=0, atol=1e-5)
    assert not torch.allclose(sample(5, 5, seed=8), whole, atol=1e-2)
    assert not torch.allclose(whole[0], whole[1], atol=1e-2)
