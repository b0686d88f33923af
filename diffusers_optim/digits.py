"""The built-in data set: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, needs no network).

One fixed split serves everyone: the diffusion model and the quality metrics' feature network train on `train`,
which is also the sample-quality reference; validation loss and the quality metrics' floor (real digits scored
like samples) use `heldout`, which no model ever trains on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUM_HELDOUT = 400
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def digits_split() -> dict[str, np.ndarray]:
    """Fixed split of the 1797 digits: train/heldout images (N, 8, 8) as float32 in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    train, heldout = order[:-NUM_HELDOUT], order[-NUM_HELDOUT:]
    return {
        "train_images": images[train],
        "train_labels": data.target[train],
        "heldout_images": images[heldout],
        "heldout_labels": data.target[heldout],
    }
