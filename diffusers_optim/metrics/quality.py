"""Sample quality that works offline: FD, KID, precision/recall/density/coverage and class statistics.

FD and KID are torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` with our own feature
network passed as `feature=`; precision, recall, density and coverage (Kynkäänniemi et al. 2019, Naeem et al.
2020) are the reference implementation of the latter paper (`prdc`). Two feature networks, one interface
(`.name`, `.evaluate(samples) -> dict`, `.floor(num_samples) -> dict`):
- digits: a small CNN that ships with the package (`assets/digits_features.safetensors`, trained on the
  train split only by `scripts/train_digits_features.py`). The reference is the training split (what the
  diffusion model learns); the floor is the held-out split, which neither network ever trains on.
- anything else: a user-provided Inception TorchScript file (`--inception_weights PATH`), e.g. NVlabs'
  `inception-2015-12-05.pt`, called as `net(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)`
  (the file resizes to 299x299 itself), against the validation images. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Protocol

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_optim.errors import UserError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DIGITS_WEIGHTS = ASSETS_DIR / "digits_features.safetensors"
DIGITS_RESOLUTION = 8
NUM_CLASSES = 10
# A class is "covered" when at least this share of samples (and at least one sample) is predicted as it.
COVERAGE_MIN_FRAC = 0.01
KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000
NEAREST_K = 5  # the k of the k-nearest-neighbour balls of precision/recall/density/coverage (the papers' choice)
MIN_SAMPLES = NEAREST_K + 2  # prdc partitions each row of distances at index k + 1 (itself and k neighbours)
FLOOR_DRAWS = 10  # the floor is the mean over this many random subsets of the real images
# The shipped network's floors depend only on the sample count: computed once per process, shared by every run in
# it (a comparison's in-process runs, a benchmark's Trainers); ten subsets cost seconds at small sizes.
_PACKAGE_FLOORS: dict[int, dict[str, float]] = {}
EVAL_SEED = 0  # fixed, so every run (and every optimizer) is scored on the same KID subsets and floor subsets


class QualityMetric(Protocol):
    """What the trainer needs from a sample-quality metric."""

    name: str

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]: ...

    def floor(self, num_samples: int) -> dict[str, float]: ...


# ---- the metrics, on any feature extractor --------------------------------------------------------------


class FeatureDistances:
    """FD and KID (torchmetrics) and precision/recall/density/coverage (prdc) against fixed reference images.

    `extractor` maps images (N, C, H, W) in [-1, 1] to features (N, D) and has a `num_features` attribute.
    """

    def __init__(self, extractor: nn.Module, reference_images: torch.Tensor, fd_key: str,
                 device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.extractor, self.fd_key, self.device = extractor.to(device).eval(), fd_key, torch.device(device)
        self.extractor.requires_grad_(False)
        # sync_on_compute=False: one process scores the samples it holds; there is nothing to gather
        common = dict(feature=self.extractor, reset_real_features=False, sync_on_compute=False)
        self.fd = FrechetInceptionDistance(**common).to(self.device)
        with warnings.catch_warnings():  # "will save all extracted features": a few thousand small vectors here
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(subsets=KID_NUM_SUBSETS, subset_size=KID_SUBSET_SIZE, **common)
        self.kid.to(self.device)
        with torch.no_grad():
            for batch in reference_images.split(256):
                self.fd.update(batch.to(self.device), real=True)
                self.kid.update(batch.to(self.device), real=True)
        self.reference_features = self.features(reference_images).numpy()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D) of images in [-1, 1], as float32 on the CPU."""
        return torch.cat([self.extractor(b.to(self.device)).float().cpu() for b in images.split(256)])

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """FD, KID, precision, recall, density and coverage of `images` against the reference."""
        self.fd.reset()  # keeps the reference (reset_real_features=False), drops the previous samples
        self.kid.reset()
        for batch in images.split(256):
            self.fd.update(batch.to(self.device), real=False)
            self.kid.update(batch.to(self.device), real=False)
        # torchmetrics' KID draws its subsets from the global RNG: fork it, so scores are reproducible and
        # training's random state is untouched; subsets cannot be larger than the smaller set
        self.kid.subset_size = min(KID_SUBSET_SIZE, len(images), len(self.reference_features))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED)
            kid_mean, _ = self.kid.compute()
        return {self.fd_key: float(self.fd.compute()), "eval/kid": float(kid_mean),
                **precision_recall(self.reference_features, self.features(images).numpy())}


def precision_recall(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """eval/precision, eval/recall, eval/density, eval/coverage of fake features (N, D) against real ones."""
    # torchmetrics has no generative precision/recall and torch-fidelity's needs torchvision: use the
    # authors' own reference implementation (it prints the set sizes, which we keep out of the logs)
    from prdc import compute_prdc

    # it also asks scikit-learn for 8 jobs through a joblib call that scikit-learn warns about on every use; joblib's
    # threads cost more than they save at these sizes (BLAS still threads the distances)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), joblib.parallel_config("sequential"):
        warnings.filterwarnings("ignore", message=".*sklearn.utils.parallel.delayed", category=UserWarning)
        scores = compute_prdc(real_features=real, fake_features=fake, nearest_k=NEAREST_K)
    return {f"eval/{name}": float(scores[name]) for name in ("precision", "recall", "density", "coverage")}


def class_statistics(probs: torch.Tensor) -> dict[str, float]:
    """Entropy (nats) of the predicted-class histogram and the classes covered, from (N, K) class probabilities."""
    predicted = probs.argmax(dim=1)
    counts = torch.bincount(predicted, minlength=probs.shape[1]).double()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    min_count = max(1, math.ceil(COVERAGE_MIN_FRAC * len(probs)))
    return {"eval/class_entropy": abs(entropy.item()),  # abs: -0.0 for one class
            "eval/classes_covered": float((counts >= min_count).sum().item())}


def _check_num_samples(samples: torch.Tensor) -> None:
    if len(samples) < MIN_SAMPLES:
        raise UserError(f"sample-quality metrics need at least {MIN_SAMPLES} samples (k-nearest neighbours with "
                        f"k={NEAREST_K}), got {len(samples)}: raise --num_eval_samples")


def _check_images(samples: torch.Tensor) -> torch.Tensor:
    """Images as float in [-1, 1]; NaN/inf (a diverged model) become finite with one warning."""
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


def to_digits_input(images: torch.Tensor) -> torch.Tensor:
    """Finite images (N, C, R, R) in [-1, 1] at any R -> (N, 1, 8, 8): area-downsampled, channels averaged."""
    x = images.float().clamp(-1, 1).mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="area")
    return x


def digits_split_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split ("train" or "heldout") of the digits as (N, 1, 8, 8) in [-1, 1], and its labels."""
    from diffusers_optim.digits import digits_split

    data = digits_split()
    images = torch.from_numpy(data[f"{split}_images"]).unsqueeze(1) * 2 - 1
    return images, torch.from_numpy(data[f"{split}_labels"]).long()


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out digits as (N, 1, 8, 8) in [-1, 1], and their labels."""
    return digits_split_images("heldout")


class DigitsFeatures(nn.Module):
    """The digits network's penultimate features, scaled so real digits have mean square 1 per dimension."""

    def __init__(self, net: DigitsFeatureNet, scale: float = 1.0):
        super().__init__()
        self.net, self.scale = net, scale
        self.num_features = net.fc.out_features  # torchmetrics reads it instead of probing a 299x299 image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_digits_input(images)) / self.scale


class DigitsQuality:
    """Sample quality of generated digits in the shipped feature network's space, against the training split."""

    name = "digits"

    def __init__(self, net: DigitsFeatureNet, device: str | torch.device = "cpu"):
        reference = digits_split_images("train")[0]
        self.net = net.eval()
        with torch.no_grad():
            raw = net.features(to_digits_input(reference))
        # Inception's pool features have O(1) entries; ours are scaled to match, so KID's kernel
        # (x.y / d + 1)^3 sees O(1) inner products instead of O(40)
        self.features = DigitsFeatures(net, raw.square().mean().sqrt().item())
        self.distances = FeatureDistances(self.features, reference, "eval/fd", device)
        self.floor_images = heldout_digits()[0]
        self._floors: dict[int, dict[str, float]] = {}

    @classmethod
    def from_package(cls, device: str | torch.device = "cpu") -> DigitsQuality:
        """The feature network whose weights ship in `diffusers_optim/assets`."""
        quality = cls(load_digits_feature_net(), device=device)
        quality._floors = _PACKAGE_FLOORS
        return quality

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]:
        """eval/fd, eval/kid, eval/precision, eval/recall, eval/density, eval/coverage and class statistics."""
        _check_num_samples(samples)
        samples = _check_images(samples)
        with torch.no_grad():
            probs = self.net(to_digits_input(samples).to(self.distances.device)).softmax(dim=1).cpu()
        return {**self.distances.evaluate(samples), **class_statistics(probs)}

    def floor(self, num_samples: int) -> dict[str, float]:
        """eval_floor/*: the metrics of real held-out digits at the same sample count (mean of a few subsets)."""
        n = max(MIN_SAMPLES, min(num_samples, len(self.floor_images)))
        if n not in self._floors:
            g = torch.Generator().manual_seed(EVAL_SEED)
            draws = [self.evaluate(self.floor_images[torch.randperm(len(self.floor_images), generator=g)[:n]])
                     for _ in range(FLOOR_DRAWS)]
            floor = {k.replace("eval/", "eval_floor/", 1): float(np.mean([d[k] for d in draws])) for k in draws[0]}
            # how much FD moves between equally good sample sets of this size: smaller gaps are noise
            fd_sd = float(np.std([d["eval/fd"] for d in draws], ddof=1))
            self._floors[n] = {**floor, "eval_floor/fd_sd": fd_sd, "eval_floor/num_samples": float(n)}
        return self._floors[n]


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


class TorchScriptFeatures(nn.Module):
    """A TorchScript Inception file as a feature extractor: images in [-1, 1] in, fed to it as uint8 RGB."""

    def __init__(self, weights_path: Path, device: torch.device):
        super().__init__()
        self.weights_path = weights_path
        self.net = _load_torchscript(weights_path, device)
        self._kwargs = {"return_features": True} if _accepts(self.net, "return_features") else {}
        self.num_features = 0  # set from the first reference batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().clamp(-1, 1)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = ((images + 1) * 127.5).round().to(torch.uint8)
        try:
            feats = self.net(images, **self._kwargs)
        except Exception as err:  # TorchScript raises plain RuntimeErrors for every kind of mismatch
            raise UserError(
                f"--inception_weights {self.weights_path} failed on uint8 images {tuple(images.shape)}: "
                f"{str(err).strip().splitlines()[0]}"
            ) from err
        return feats.reshape(len(images), -1).float()


class InceptionFID:
    """FID, KID and precision/recall with a TorchScript Inception file on disk, against the validation images."""

    name = "inception"

    def __init__(self, weights_path: str | Path, reference_images: torch.Tensor,
                 device: str | torch.device = "cpu"):
        device = torch.device(device)
        extractor = TorchScriptFeatures(Path(weights_path), device)
        with torch.no_grad():
            extractor.num_features = extractor(_check_images(reference_images[:2]).to(device)).shape[1]
        self.distances = FeatureDistances(extractor, _check_images(reference_images), "eval/fid", device)
        if len(reference_images) <= extractor.num_features:
            logger.warning(
                "FID reference has %d images for %d-d features: its covariance is singular, so FID is "
                "biased upwards; compare runs only against the same reference.",
                len(reference_images), extractor.num_features,
            )

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]:
        """eval/fid, eval/kid, eval/precision, eval/recall, eval/density, eval/coverage."""
        _check_num_samples(samples)
        return self.distances.evaluate(_check_images(samples))

    def floor(self, num_samples: int) -> dict[str, float]:
        """No floor: every real image at hand is in the reference, so none is left to score against it."""
        return {}
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
    num_samples: int = MIN_SAMPLES,
) -> QualityMetric | None:
    """The sample-quality metric for a data set: digits' own network, Inception FID, or None (logged once).

    Checks `num_samples` (--num_eval_samples) now, so a run does not fail at its end, after training.
    """
    if (dataset_name in (None, "digits") or inception_weights) and num_samples < MIN_SAMPLES:
        raise UserError(f"--num_eval_samples must be at least {MIN_SAMPLES} (precision/recall use the "
                        f"{NEAREST_K} nearest neighbours of each sample), got {num_samples}")
    if dataset_name in (None, "digits"):
        if inception_weights:
            logger.warning(
                "--inception_weights is ignored for the digits data set: it has its own feature network."
            )
        return DigitsQuality.from_package(device=device)
    if inception_weights:
        if reference_images is None or len(reference_images) < MIN_SAMPLES:
            raise UserError(
                f"FID needs at least {MIN_SAMPLES} reference (validation) images; raise --num_validation_images"
            )
        return InceptionFID(inception_weights, reference_images, device=device)
    logger.info(
        "No sample-quality metric for data set '%s': pass --inception_weights PATH (a TorchScript Inception, "
        "e.g. inception-2015-12-05.pt) to log eval/fid and eval/kid.",
        dataset_name,
    )
    return None
