"""Deterministic data order and noise, and image generation with the diffusers DDPMPipeline."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a cheap 64-bit hash with good avalanche.

    Written out because numpy's SeedSequence, the library way to hash a tuple into a seed, costs ~30 us a call,
    which is ~2 ms per 64-sample micro-batch; this costs ~1 us.
    """
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, step: int, micro: int, index: int) -> int:
    """A distinct, reproducible 64-bit seed for one sample: (run seed, optimizer step, micro-batch, GLOBAL index)."""
    return _mix64(_mix64(_mix64(_mix64(seed & _MASK64) ^ step) ^ micro) ^ index)


def micro_batch_noise(seed: int, step: int, micro: int, first_index: int, batch_size: int,
                      sample_shape: tuple[int, ...], num_timesteps: int, device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps of global samples first_index .. first_index + batch_size - 1, drawn on `device`.

    Each sample's draw depends only on its own seed, so a rank pays for its local batch alone, whatever the
    number of processes, and N processes at batch B see exactly what one process sees at batch N*B. torch has
    no counter-based generator that can be indexed per sample, hence one draw per sample from a re-seeded
    device generator (on a GPU: one small kernel per sample); the timestep comes from the same hash.
    """
    seeds = [sample_seed(seed, step, micro, first_index + j) for j in range(batch_size)]
    timesteps = torch.tensor([_mix64(s) % num_timesteps for s in seeds], dtype=torch.long).to(device)
    generator = torch.Generator(device=device)
    noise = torch.empty((batch_size, *sample_shape), device=device, dtype=torch.float32)
    for j, s in enumerate(seeds):
        torch.randn(sample_shape, generator=generator.manual_seed(s), device=device, out=noise[j])
    return noise.to(dtype), timesteps


AUGMENT_STREAM = 0xA0C  # keeps augmentation seeds apart from the noise seeds' (step, micro) coordinates


class BatchStream(torch.utils.data.Sampler):
    """Infinite batch sampler: this process's `batch_size` indices of each global micro-batch, from a per-epoch
    permutation.

    Each item is (index, augmentation seed). Global micro-batch m is a run of P*B consecutive places of its epoch's
    order, rank r reading the r-th B of them, so P processes at batch B read exactly the images (and augmentations)
    that one process at batch P*B reads, in every epoch, and the stream can start at any micro-batch (resume, at the
    same or another process count). An epoch holds whole global micro-batches: the last partial one is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, rank: int, seed: int, start: int = 0):
        if num_items < batch_size * num_processes:
            from diffusers_optim.errors import UserError

            across = f" x {num_processes} processes" if num_processes > 1 else ""
            raise UserError(f"the training set has {num_items} images, fewer than --train_batch_size {batch_size}"
                            f"{across}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.rank, self.start = num_processes, rank, start
        # Counted in global micro-batches, not in per-process slots: with slots, an epoch of N // B slots that P
        # does not divide ended inside a global micro-batch, and from the second epoch on P processes at batch B
        # read other images than one process at batch P*B.
        self.micro_batches_per_epoch = num_items // (batch_size * num_processes)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        epoch, order = -1, None
        while True:
            if micro // self.micro_batches_per_epoch != epoch:
                epoch = micro // self.micro_batches_per_epoch
                order = self.epoch_order(epoch)
            j = micro % self.micro_batches_per_epoch
            first = (j * self.num_processes + self.rank) * self.batch_size
            indices = order[first:first + self.batch_size].tolist()
            # each item comes with the seed of its random crop/flip, keyed by its place in the epoch's order, so
            # augmentation is the same in DataLoader workers, after a resume and at any process count
            yield [(i, sample_seed(self.seed, AUGMENT_STREAM, epoch, first + k)) for k, i in enumerate(indices)]
            micro += 1


SAMPLING_STREAM = 0x5A3  # keeps the sampling noise's seeds apart from training's (step, micro) coordinates


def sampling_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, the image's index) with the training noise's per-sample hash.

    diffusers' DDPMPipeline and DDPMScheduler.step draw row i of every noise tensor from generator i, so image i's
    noise (the start and every step's) is the same in any batch, on any process, at any process count. A CPU
    generator, as before: the same images on every device.
    """
    return [torch.Generator().manual_seed(sample_seed(seed, SAMPLING_STREAM, 0, i)) for i in indices]


def rank_chunks(num_images: int, chunk: int, rank: int, num_processes: int) -> list[range]:
    """The images process `rank` generates: chunks of `chunk` consecutive indices, dealt round-robin (chunk k to
    process k % num_processes), so every chunk holds the same images whatever the process count."""
    return [range(s, min(s + chunk, num_images)) for s in range(rank * chunk, num_images, num_processes * chunk)]


def sample_shape(unet) -> tuple[int, int, int]:
    """(C, H, W) of the images DDPMPipeline draws with this UNet."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return unet.config.in_channels, height, width


@torch.no_grad()
def generate_images(unet, noise_scheduler, num_images: int, seed: int, num_inference_steps: int,
                    accelerator=None, batch_size: int = 32) -> torch.Tensor | None:
    """`num_images` DDPM samples from fixed-seed noise, as a float tensor (N, C, H, W) in [-1, 1] on the CPU.

    Every process generates its share (`rank_chunks` of `batch_size` images per forward pass) and the main process
    gets them all, in order; the other processes get None. The result is bit-identical at any process count: each
    image has its own noise and each chunk the same images (so even kernels whose rounding depends on the batch
    size see the same batches).
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with autocast:
        local = [_sample_chunk(pipe, chunk, seed, num_inference_steps)
                 for chunk in rank_chunks(num_images, batch_size, rank, world)]
    if world == 1:
        return torch.cat(local)
    return gather_chunks(local, num_images, batch_size, sample_shape(unet), accelerator)


def _sample_chunk(pipe, indices: range, seed: int, num_inference_steps: int) -> torch.Tensor:
    out = pipe(batch_size=len(indices), generator=sampling_generators(seed, indices),
               num_inference_steps=num_inference_steps, output_type="np").images
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float() * 2 - 1


def gather_chunks(local: list[torch.Tensor], num_images: int, chunk: int, shape: tuple[int, ...],
                  accelerator) -> torch.Tensor | None:
    """Every process's chunks on the main process, in image order (None elsewhere).

    One gather per round: in round j process r sends its chunk j, which is global chunk j * P + r, so the rounds
    concatenated are the chunks in order; a short or missing chunk is padded with zeros, cut off at the end. A
    round at a time bounds the device memory of a gather to P chunks, and only the main process keeps them.
    """
    world = accelerator.num_processes
    rounds = math.ceil(math.ceil(num_images / chunk) / world)
    kept = []
    for j in range(rounds):
        block = torch.zeros((chunk, *shape))
        if j < len(local):
            block[:len(local[j])] = local[j]
        gathered = accelerator.gather(block.to(accelerator.device))  # (P * chunk, C, H, W), process order
        if accelerator.is_main_process:
            kept.append(gathered.cpu())
    return torch.cat(kept)[:num_images] if accelerator.is_main_process else None


def images_to_grid(images: torch.Tensor, upscale: int | None = None) -> Image.Image:
    """A near-square grid of images in [-1, 1], upscaled (nearest) so small samples stay visible."""
    upscale = upscale or max(1, 64 // images.shape[-1])
    from diffusers.utils import make_image_grid

    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    size = images.shape[-1] * upscale
    # a thin grey frame keeps dark-background samples (digits) from running into each other
    pil = [ImageOps.expand(im.resize((size, size), Image.NEAREST), border=2, fill=96) for im in pil]
    cols = int(np.ceil(np.sqrt(len(pil))))
    rows = int(np.ceil(len(pil) / cols))
    pil += [Image.new(pil[0].mode, pil[0].size)] * (rows * cols - len(pil))
    return make_image_grid(pil, rows=rows, cols=cols)
