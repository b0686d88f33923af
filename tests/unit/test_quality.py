"""Sample-quality metrics: pure maths against closed forms, the shipped digits network, the Inception path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from diffusers_optim.errors import UserError
from diffusers_optim.metrics import quality
from diffusers_optim.metrics.quality import (
    DigitsQuality,
    InceptionFID,
    build_quality_metric,
    digits_split_images,
    heldout_digits,
    precision_recall,
)

PRC_KEYS = {"eval/precision", "eval/recall", "eval/density", "eval/coverage"}
DIGITS_KEYS = {"eval/fd", "eval/kid", "eval/class_entropy", "eval/classes_covered", *PRC_KEYS}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_quality() -> DigitsQuality:
    return DigitsQuality.from_package()


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    return heldout_digits()


def noise_images(n: int, channels: int = 1, resolution: int = 16, seed: int = 0) -> torch.Tensor:
    return (
        torch.rand(n, channels, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    )


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A separable 5-tap Gaussian blur with replicated edges, written out so the test owns its input."""
    taps = torch.exp(-(torch.arange(5.0) - 2) ** 2 / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).view(1, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), kernel)


# ---- the wiring of the ecosystem's metrics -----------------------------------------------------------------


def fd_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """Reference: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) with scipy's sqrtm, in float64."""
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real))


def test_fd_is_the_closed_form_on_the_shipped_features(digits_quality, heldout):
    samples = heldout[0][:150]
    result = digits_quality.evaluate(samples)
    with torch.no_grad():
        fake = digits_quality.features(samples).double().numpy()
        real = digits_quality.features(digits_split_images("train")[0]).double().numpy()
    assert result["eval/fd"] == pytest.approx(fd_closed_form(fake, real), rel=1e-4)
    # the features are scaled so the reference has mean square 1 per dimension (Inception-like scale for KID)
    assert np.mean(real**2) == pytest.approx(1.0, rel=1e-4)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4)).astype(np.float32)
    same = precision_recall(real, rng.normal(size=(300, 4)).astype(np.float32))
    far = precision_recall(real, rng.normal(50.0, 1.0, size=(300, 4)).astype(np.float32))
    collapsed = precision_recall(real, np.repeat(real[:1], 300, axis=0))
    assert set(same) == PRC_KEYS
    assert same["eval/precision"] > 0.9 and same["eval/recall"] > 0.9 and same["eval/coverage"] > 0.9
    assert all(v == 0.0 for v in far.values())
    # every copy of one real point lies in that point's own ball, and no real point is in a radius-0 ball
    assert collapsed["eval/precision"] == 1.0 and collapsed["eval/recall"] == 0.0


def test_kid_scores_are_reproducible_and_leave_the_global_rng_alone(digits_quality, heldout):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = digits_quality.evaluate(heldout[0][:64])["eval/kid"]
    assert torch.equal(torch.rand(3), expected_next)
    assert digits_quality.evaluate(heldout[0][:64])["eval/kid"] == first


# ---- the shipped digits network -------------------------------------------------------------------


def test_shipped_weights_match_record_and_classify_heldout(heldout):
    record = json.loads(quality.DIGITS_WEIGHTS.with_suffix(".json").read_text())
    assert hashlib.sha256(quality.DIGITS_WEIGHTS.read_bytes()).hexdigest() == record["sha256"]
    net = quality.load_digits_feature_net()
    images, labels = heldout
    with torch.no_grad():
        accuracy = (net(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(record["heldout_accuracy"], abs=1e-3)


def test_training_script_is_deterministic():
    spec = importlib.util.spec_from_file_location(
        "train_digits_features", REPO / "scripts/train_digits_features.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does: two OpenMP threads on a busy 2-core machine are 50x slower
    try:
        first, second = script.train(epochs=1, seed=3), script.train(epochs=1, seed=3)
    finally:
        torch.set_num_threads(num_threads)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_evaluate_real_digits_at_16x16_rgb(digits_quality, heldout):
    images = F.interpolate(heldout[0], scale_factor=2, mode="nearest").repeat(1, 3, 1, 1)
    result = digits_quality.evaluate(images)
    assert set(result) == DIGITS_KEYS
    assert all(isinstance(v, float) for v in result.values())
    # the held-out digits after a lossless up/down round trip score what the held-out digits score
    assert result == pytest.approx(digits_quality.evaluate(heldout[0]), rel=1e-4, abs=1e-6)
    assert result["eval/class_entropy"] == pytest.approx(math.log(10), abs=0.1)
    assert result["eval/classes_covered"] == 10


def degenerate_samples(heldout: tuple[torch.Tensor, torch.Tensor], n: int = 256) -> dict[str, torch.Tensor]:
    images, labels = heldout
    return {
        "noise": noise_images(n, resolution=8),
        "constant": torch.full((n, 1, 8, 8), -1.0),
        "blurred": gaussian_blur(images[:n], sigma=1.0),
        "single class": images[labels == 3].repeat(8, 1, 1, 1)[:n],
    }


def test_real_digits_sit_at_the_floor(digits_quality, heldout):
    floor = digits_quality.floor(256)
    assert floor["eval_floor/num_samples"] == 256
    assert set(floor) == ({k.replace("eval/", "eval_floor/") for k in DIGITS_KEYS}
                          | {"eval_floor/num_samples", "eval_floor/fd_sd"})
    # FD of 256 real digits scatters by ~0.04 around the floor (~0.24); precision and recall by ~0.01
    assert 0.01 < floor["eval_floor/fd_sd"] < 0.1
    # subsets of held-out digits that are not the floor's draws
    for seed in range(3):
        real = digits_quality.evaluate(heldout[0][torch.randperm(400, generator=torch.Generator().manual_seed(seed + 100))[:256]])
        assert real["eval/fd"] == pytest.approx(floor["eval_floor/fd"], abs=3 * floor["eval_floor/fd_sd"])
        assert real["eval/precision"] == pytest.approx(floor["eval_floor/precision"], abs=0.05)
        assert real["eval/recall"] == pytest.approx(floor["eval_floor/recall"], abs=0.05)
    assert floor["eval_floor/precision"] > 0.9 and floor["eval_floor/recall"] > 0.9
    assert digits_quality.floor(10_000)["eval_floor/num_samples"] == 400  # no more held-out digits than that


@pytest.mark.parametrize("kind", ["noise", "constant", "blurred", "single class"])
def test_fooling_samples_score_clearly_worse_than_real_digits(digits_quality, heldout, kind):
    floor = digits_quality.floor(256)
    result = digits_quality.evaluate(degenerate_samples(heldout)[kind])
    # measured: FD 17-37 against a floor of ~0.21; each fails precision (not digits) or recall (not all digits)
    assert result["eval/fd"] > 20 * floor["eval_floor/fd"]
    assert min(result["eval/precision"], result["eval/recall"]) < 0.5 * min(
        floor["eval_floor/precision"], floor["eval_floor/recall"])
    assert result["eval/coverage"] < 0.5 * floor["eval_floor/coverage"]


def test_a_single_repeated_digit_covers_one_class(digits_quality, heldout):
    one_digit = digits_quality.evaluate(heldout[0][:1].repeat(64, 1, 1, 1))
    assert one_digit["eval/class_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert one_digit["eval/classes_covered"] == 1
    assert one_digit["eval/recall"] == 0.0


def test_evaluate_scores_diverged_samples_instead_of_crashing(digits_quality):
    samples = noise_images(32)
    samples[:4] = float("nan")
    samples[4:8] = float("inf")
    result = digits_quality.evaluate(samples)
    assert all(math.isfinite(v) for v in result.values())
    assert result["eval/fd"] > 10.0


def test_evaluate_needs_enough_samples_for_the_neighbourhoods(digits_quality, heldout):
    with pytest.raises(UserError, match="--num_eval_samples"):
        digits_quality.evaluate(heldout[0][: quality.MIN_SAMPLES - 1])


# ---- Inception path with a stand-in TorchScript file ----------------------------------------------


class TinyInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 (N, 3, H, W) -> pooled features, like the real file."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.shape[1] != 3:
            raise RuntimeError("expected uint8 RGB images")
        if not return_features:
            raise RuntimeError("this stand-in only returns features")
        return F.adaptive_avg_pool2d(img.float() / 255, 4).flatten(1)


class NoKwargNet(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean(dim=(2, 3))


@pytest.fixture
def inception_file(tmp_path) -> Path:
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def reference_images(n: int = 96) -> torch.Tensor:
    images = heldout_digits()[0][:n]
    return F.interpolate(images, size=16, mode="nearest")


def test_inception_fid_with_scripted_stand_in(inception_file):
    reference = reference_images()
    metric = build_quality_metric("cifar10", str(inception_file), reference)
    assert isinstance(metric, InceptionFID) and metric.name
    same = metric.evaluate(reference)
    noise = metric.evaluate(noise_images(96))
    assert set(same) == {"eval/fid", "eval/kid", *PRC_KEYS}
    assert same["eval/fid"] < 1e-4
    assert metric.floor(96) == {}
    assert noise["eval/fid"] > 100 * max(same["eval/fid"], 1e-4)
    assert noise["eval/kid"] > same["eval/kid"]


def test_inception_fid_accepts_a_forward_without_return_features(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(NoKwargNet()).save(str(path))
    metric = InceptionFID(path, reference_images(32))
    assert set(metric.evaluate(noise_images(16))) == {"eval/fid", "eval/kid", *PRC_KEYS}


def test_inception_weights_missing_or_invalid(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt"):
        build_quality_metric("cifar10", str(missing), reference_images(8))
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a model")
    with pytest.raises(UserError, match="garbage.pt"):
        build_quality_metric("cifar10", str(garbage), reference_images(8))


def test_inception_weights_that_fail_on_images(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    with pytest.raises(UserError, match="wrong.pt"):
        InceptionFID(path, reference_images(8))


# ---- builder ----------------------------------------------------------------------------------------


def test_build_quality_metric_digits(digits_quality):
    assert isinstance(build_quality_metric("digits", None, None), DigitsQuality)
    assert isinstance(build_quality_metric(None, None, None), DigitsQuality)


def test_build_quality_metric_none_without_weights_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger=quality.__name__):
        assert build_quality_metric("cifar10", None, reference_images(8)) is None
    messages = [r.getMessage() for r in caplog.records if r.name == quality.__name__]
    assert len(messages) == 1
    assert "--inception_weights PATH" in messages[0]
