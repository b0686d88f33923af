"""Sample quality that works offline: Fréchet distance, KID and class statistics of generated images.

Two feature networks, one interface (`.name`, `.evaluate(samples) -> dict[str, float]`):
- digits: a small CNN that ships with the package (`assets/digits_features.safetensors`, trained on the
  train split only by `scripts/train_digits_features.py`); the reference is the whole held-out split.
- anything else: a user-provided Inception TorchScript file (`--inception_weights PATH`), e.g. NVlabs'
  `inception-2015-12-05.pt`, called as `net(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)`
  (the file resizes to 299x299 itself). Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_optim.errors import UserError

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DIGITS_WEIGHTS = ASSETS_DIR / "digits_features.safetensors"
DIGITS_RESOLUTION = 8
NUM_CLASSES = 10
# A sample counts as "confident" when the digits classifier gives its top class at least this probability:
# real held-out digits clear it ~97% of the time, noise and blurry mixtures of digits rarely do.
CONFIDENCE_THRESHOLD = 0.9
# A class is "covered" when at least this share of samples (and at least one sample) is predicted as it.
COVERAGE_MIN_FRAC = 0.01
KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000
EVAL_SEED = 0  # fixed, so every run (and every optimizer) is scored on the same KID subsets


class QualityMetric(Protocol):
    """What the trainer needs from a sample-quality metric."""

    name: str

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]: ...


# ---- pure maths ---------------------------------------------------------------------------------


def feature_stats(feats: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    feats = _as_float64(feats)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature_stats needs features of shape (N >= 2, D), got {tuple(feats.shape)}")
    return feats.mean(dim=0), torch.cov(feats.T)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2).
    """
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    # tr((s1 s2)^1/2) = tr((r s2 r)^1/2) with r = s1^1/2. The right side is symmetric PSD, so an eigen
    # decomposition gives it exactly, with no complex parts to discard (scipy's sqrtm of the non-symmetric
    # s1 s2 returns small imaginary noise and can fail on singular covariances).
    root1 = _sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(distance.item(), 0.0)  # equal inputs can round to -1e-12


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def _subset_kernel_sums(x: torch.Tensor, y: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """For each row of the 0/1 subset masks sx (S, Nx), sy (S, Ny): the sum of k(x_i, y_j) over the subset."""
    # sum_ij sx_i K_ij sy_j for all subsets at once: one kernel pass, in row chunks to bound memory.
    acc = torch.zeros(len(sx), len(y), dtype=x.dtype)
    for rows in torch.arange(len(x)).split(1024):
        acc += sx[:, rows] @ _poly_kernel(x[rows], y)
    return (acc * sy).sum(dim=1)


def _subset_masks(n: int, m: int, num_subsets: int, generator: torch.Generator) -> torch.Tensor:
    """0/1 masks (num_subsets, n), each row choosing m of n items without replacement."""
    chosen = torch.rand(num_subsets, n, generator=generator).argsort(dim=1)[:, :m]
    return torch.zeros(num_subsets, n, dtype=torch.float64).scatter_(1, chosen, 1.0)


def kernel_inception_distance(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    num_subsets: int = KID_NUM_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = EVAL_SEED,
) -> float:
    """KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets of both sets.

    The subset size shrinks to the smaller set when either has fewer features than `subset_size`.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(a)} and {len(b)}")
    generator = torch.Generator().manual_seed(seed)
    sa = _subset_masks(len(a), m, num_subsets, generator)
    sb = _subset_masks(len(b), m, num_subsets, generator)
    # the unbiased estimate leaves out k(x_i, x_i): subtract each subset's share of the kernel's diagonal
    within_a = _subset_kernel_sums(a, a, sa, sa) - sa @ (a.square().mean(dim=1) + 1) ** 3
    within_b = _subset_kernel_sums(b, b, sb, sb) - sb @ (b.square().mean(dim=1) + 1) ** 3
    across = _subset_kernel_sums(a, b, sa, sb)
    mmd2 = (within_a + within_b) / (m * (m - 1)) - 2 * across / (m * m)
    return mmd2.mean().item()


def class_statistics(probs: torch.Tensor) -> dict[str, float]:
    """Confident share, entropy (nats) of the predicted-class histogram and classes covered, from (N, K) probs."""
    top_prob, predicted = probs.max(dim=1)
    counts = torch.bincount(predicted, minlength=probs.shape[1]).double()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    min_count = max(1, math.ceil(COVERAGE_MIN_FRAC * len(probs)))
    return {
        "eval/confident_frac": (top_prob >= CONFIDENCE_THRESHOLD).double().mean().item(),
        "eval/class_entropy": entropy.item(),
        "eval/classes_covered": float((counts >= min_count).sum().item()),
    }


def _as_float64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _check_num_samples(samples: torch.Tensor) -> None:
    if len(samples) < 2:
        raise UserError(
            f"sample-quality metrics need at least 2 samples, got {len(samples)}: raise --num_eval_samples"
        )


def _check_images(samples: torch.Tensor) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = getattr(samples, "shape", type(samples).__name__)
        raise ValueError(f"expected images as a tensor (N, C, H, W) in [-1, 1], got {shape}")
    samples = samples.detach().float()
    if not torch.isfinite(samples).all():
        # A diverged model must score badly, not crash the run that is comparing it with others.
        logger.warning("some samples contain NaN or inf (a diverged model?): scoring them with NaN set to 0")
        samples = torch.nan_to_num(samples, nan=0.0)
    return samples.clamp(-1, 1)


# ---- digits ---------------------------------------------------------------------------------------


class DigitsFeatureNet(nn.Module):
    """Small CNN for 8x8 grayscale digits in [-1, 1]; `features` is the 64-d penultimate layer."""

    def __init__(self, width: int = 32, num_features: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 4 * 4, num_features)
        self.head = nn.Linear(num_features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_digits_input(samples: torch.Tensor) -> torch.Tensor:
    """Images (N, C, R, R) in [-1, 1] at any R -> (N, 1, 8, 8): area-downsampled, channels averaged."""
    x = _check_images(samples).mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="area")
    return x


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out digits as (N, 1, 8, 8) in [-1, 1], and their labels."""
    from diffusers_optim.digits import digits_split

    split = digits_split()
    images = torch.from_numpy(split["heldout_images"]).unsqueeze(1) * 2 - 1
    return images, torch.from_numpy(split["heldout_labels"]).long()


class DigitsQuality:
    """FD, KID and class statistics of generated digits, in the shipped feature network's space."""

    name = "digits"

    def __init__(self, net: DigitsFeatureNet, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.feature_scale = 1.0  # raw features first, to measure the scale
        reference = self.logits_and_features(heldout_digits()[0])[1]
        # Scale features so the real digits have mean square 1 per dimension, as Inception's pool features
        # roughly do: the KID kernel (x.y / d + 1)^3 then sees O(1) inner products instead of O(40).
        self.feature_scale = reference.square().mean().sqrt().item()
        self.reference_features = reference / self.feature_scale
        self.reference_stats = feature_stats(self.reference_features)

    @classmethod
    def from_package(cls, device: str | torch.device = "cpu") -> DigitsQuality:
        """The feature network whose weights ship in `diffusers_optim/assets`."""
        return cls(load_digits_feature_net(), device=device)

    @torch.no_grad()
    def logits_and_features(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, 10) and scaled penultimate features (N, 64) of images in [-1, 1], on the CPU."""
        feats = self.net.features(to_digits_input(samples).to(self.device))
        return self.net.head(feats).cpu(), feats.cpu().double() / self.feature_scale

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]:
        """eval/fd, eval/kid, eval/confident_frac, eval/class_entropy, eval/classes_covered of the samples."""
        _check_num_samples(samples)
        logits, feats = self.logits_and_features(samples)
        return {
            "eval/fd": frechet_distance(*feature_stats(feats), *self.reference_stats),
            "eval/kid": kernel_inception_distance(feats, self.reference_features),
            **class_statistics(logits.softmax(dim=1)),
        }


def load_digits_feature_net(path: str | Path = DIGITS_WEIGHTS) -> DigitsFeatureNet:
    """The digits feature network with weights from a safetensors file (default: the shipped one)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"digits feature weights not found at {path}; reinstall diffusers-optim or regenerate them "
            "with `python scripts/train_digits_features.py`"
        )
    net = DigitsFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


# ---- Inception (user-provided weights) -------------------------------------------------------------


class InceptionFID:
    """FID and KID with a TorchScript Inception file on disk, against fixed reference images."""

    name = "inception"

    def __init__(
        self,
        weights_path: str | Path,
        reference_images: torch.Tensor,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = _load_torchscript(self.weights_path, self.device)
        self._kwargs = {"return_features": True} if _accepts(self.net, "return_features") else {}
        self.reference_features = self.features(reference_images)
        self.reference_stats = feature_stats(self.reference_features)
        if len(self.reference_features) <= self.reference_features.shape[1]:
            logger.warning(
                "FID reference has %d images for %d-d features: its covariance is singular, so FID is "
                "biased upwards; compare runs only against the same reference.",
                *self.reference_features.shape,
            )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D) of images (N, C, H, W) in [-1, 1], fed to the network as uint8 RGB."""
        images = _check_images(images)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = ((images + 1) * 127.5).round().to(torch.uint8)
        chunks = []
        for batch in images.split(self.batch_size):
            try:
                feats = self.net(batch.to(self.device), **self._kwargs)
            except Exception as err:  # TorchScript raises plain RuntimeErrors for every kind of mismatch
                raise UserError(
                    f"--inception_weights {self.weights_path} failed on uint8 images {tuple(batch.shape)}: "
                    f"{str(err).strip().splitlines()[0]}"
                ) from err
            chunks.append(feats.reshape(len(batch), -1).float().cpu())
        return _as_float64(torch.cat(chunks))

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]:
        """eval/fid and eval/kid of the samples against the reference images."""
        _check_num_samples(samples)
        feats = self.features(samples)
        mu, sigma = feature_stats(feats)
        return {
            "eval/fid": frechet_distance(mu, sigma, *self.reference_stats),
            "eval/kid": kernel_inception_distance(feats, self.reference_features),
        }


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise UserError(f"--inception_weights {path} does not exist (expected a TorchScript .pt file)")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # a pickle, a state dict, a truncated download, ...
        raise UserError(
            f"--inception_weights {path} is not a TorchScript file (torch.jit.load failed); use e.g. "
            "NVlabs' inception-2015-12-05.pt"
        ) from err


def _accepts(net: torch.jit.ScriptModule, argument: str) -> bool:
    """Whether the scripted forward takes a keyword `argument` (NVlabs' Inception takes return_features)."""
    try:
        return any(arg.name == argument for arg in net.forward.schema.arguments)
    except AttributeError:
        return False


# ---- the one builder the trainer calls ---------------------------------------------------------------


def build_quality_metric(
    dataset_name: str | None,
    inception_weights: str | None,
    reference_images: torch.Tensor | None,
    device: str | torch.device = "cpu",
) -> QualityMetric | None:
    """The sample-quality metric for a data set: digits' own network, Inception FID, or None (logged once)."""
    if dataset_name in (None, "digits"):
        if inception_weights:
            logger.warning(
                "--inception_weights is ignored for the digits data set: it has its own feature network."
            )
        return DigitsQuality.from_package(device=device)
    if inception_weights:
        if reference_images is None or len(reference_images) < 2:
            raise UserError(
                "FID needs at least 2 reference (validation) images; raise --num_validation_images"
            )
        return InceptionFID(inception_weights, reference_images, device=device)
    logger.info(
        "No sample-quality metric for data set '%s': pass --inception_weights PATH (a TorchScript Inception, "
        "e.g. inception-2015-12-05.pt) to log eval/fid and eval/kid.",
        dataset_name,
    )
    return None
