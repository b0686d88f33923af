"""Train the digits feature network that ships in diffusers_optim/assets (deterministic, CPU, < 1 minute).

    python scripts/train_digits_features.py            # rewrites digits_features.safetensors and .json

Trains on the train split of `diffusers_optim.digits.digits_split()` only (also the quality metrics' reference);
the held-out split gives the metrics' floor and is used here only to report accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_optim.digits import digits_split
from diffusers_optim.metrics.quality import DIGITS_WEIGHTS, DigitsFeatureNet, heldout_digits

logger = logging.getLogger("train_digits_features")


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels, filling with background (-1)."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    size = x.shape[-1]
    return torch.stack([p[:, i : i + size, j : j + size] for p, (i, j) in zip(padded, offsets.tolist())])


def train(epochs: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> DigitsFeatureNet:
    """A DigitsFeatureNet trained on the train split with Adam, cosine LR and one-pixel shifts."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    split = digits_split()
    images = torch.from_numpy(split["train_images"]).unsqueeze(1) * 2 - 1
    labels = torch.from_numpy(split["train_labels"]).long()
    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    num_steps = epochs * -(-len(images) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.cross_entropy(net(random_shift(images[idx], generator)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(images).argmax(dim=1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one thread: the same float reduction order on any machine

    start = time.perf_counter()
    net = train(args.epochs, args.seed)
    heldout_acc = accuracy(net, *heldout_digits())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    record = {
        "file": args.out.name,
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "heldout_accuracy": round(heldout_acc, 4),
        "epochs": args.epochs,
        "seed": args.seed,
        "torch_version": torch.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info(
        "held-out accuracy %.2f%% (%.1f s); wrote %s",
        100 * heldout_acc,
        time.perf_counter() - start,
        args.out,
    )


if __name__ == "__main__":
    main()
