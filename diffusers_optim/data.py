"""Training data: an image folder, a `datasets` data set (saved locally or on the Hub), or the built-in digits.

Folders and data sets are streamed: before training every image's header is read and a sample is fully decoded
(all of a small folder), so a corrupt file fails the run (or is skipped, with --skip_bad_images) before any
training; the pixels are decoded lazily in DataLoader workers, so memory is O(batch x workers), not O(data set).
An image that still fails at load time is replaced by the next readable one and counted (`data/skipped_images`);
--max_bad_images decides when that stops the run. Items are float tensors (C, R, R) in [-1, 1].
Validation images are a fixed, seed-independent held-out set that never appears in training.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_optim.config import TrainConfig
from diffusers_optim.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PROGRESS_MIN_IMAGES = 300
DEFAULT_VALIDATION_IMAGES = 64  # held out from a folder or hub data set when --num_validation_images is not given
# Images fully decoded before training (evenly spread; all of a folder this small): catches a truncated file early.
NUM_SAMPLE_DECODES = 64
# An item whose image fails at load time is replaced by the next one; this many failures in a row is an error.
MAX_SUBSTITUTIONS = 32


@dataclass
class DataBundle:
    """What the trainer needs from the data: training items, frozen validation images, a name for the card."""

    train: torch.utils.data.Dataset
    validation: torch.Tensor
    name: str
    num_skipped: int = 0
    in_memory: bool = True  # False: decoded per item, so DataLoader workers pay off


def build_datasets(cfg: TrainConfig, channels: int) -> DataBundle:
    """Training set and validation images from --train_data_dir, else --dataset_name, else the digits."""
    if channels not in (1, 3):
        raise UserError(f"images must have 1 or 3 channels, got {channels}")
    if cfg.resolution < 1:
        raise UserError(f"--resolution must be positive, got {cfg.resolution}")
    if cfg.train_data_dir and cfg.dataset_name:
        # diffusers silently ignores --train_data_dir then; training on the data set the user did not mean is worse
        raise UserError("give either --dataset_name or --train_data_dir, not both")
    if cfg.train_data_dir:
        folder = Path(cfg.train_data_dir).expanduser()
        paths = list_image_files(folder)
        return build_from_images(cfg, channels, paths, open_path, name=folder.resolve().name)
    if cfg.dataset_name:
        dataset, loader = load_image_dataset(cfg)
        path = Path(cfg.dataset_name).expanduser()
        name = path.resolve().name if path.exists() else cfg.dataset_name
        return build_from_images(cfg, channels, range(len(dataset)), loader, name=name)
    return build_digits(cfg, channels)


# ---- the built-in digits -------------------------------------------------------------------------------


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory as one (N, C, R, R) tensor; only the optional flip happens per item."""

    def __init__(self, images: torch.Tensor, random_flip: bool = False) -> None:
        self.images = images
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        if not self.random_flip:  # no generator to seed: 64 of them cost ~0.2 ms of a ~45 ms demo step
            return self.images[key[0] if isinstance(key, tuple) else key]
        i, generator = item_key(key)
        image = self.images[i]
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image


def item_key(key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    """An index, or (index, augmentation seed) from BatchStream -> the index and a generator for its crop/flip."""
    if isinstance(key, tuple):
        return key[0], torch.Generator().manual_seed(key[1])
    return key, None


def digits_tensor(images: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """(N, 8, 8) floats in [0, 1] -> (N, C, R, R) in [-1, 1], resized bilinearly."""
    x = torch.from_numpy(images).float().unsqueeze(1) * 2 - 1
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.repeat(1, channels, 1, 1).contiguous()


def build_digits(cfg: TrainConfig, channels: int) -> DataBundle:
    """scikit-learn's digits: train on the fixed train split, validate on the first held-out images."""
    from diffusers_optim.digits import digits_split

    split = digits_split()
    train = split["train_images"][: cfg.max_train_samples]
    num_validation = len(split["heldout_images"]) if cfg.num_validation_images is None else cfg.num_validation_images
    validation = split["heldout_images"][: max(0, num_validation)]
    return DataBundle(
        train=TensorImages(digits_tensor(train, cfg.resolution, channels), cfg.random_flip),
        validation=digits_tensor(validation, cfg.resolution, channels),
        name="digits",
    )


# ---- image sources: a folder of files or rows of a datasets data set -----------------------------------


def list_image_files(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth), sorted, or a UserError saying what is wrong."""
    if not folder.exists():
        raise UserError(f"--train_data_dir not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"--train_data_dir is not a folder: {folder}")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"--train_data_dir is not readable (check its permissions): {folder}")

    def unreadable(err: OSError) -> None:
        raise UserError(f"cannot read folder {err.filename} under --train_data_dir: {err.strerror}")

    paths = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        # Hidden entries are skipped: macOS leaves '._name.png' resource forks that are not images.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [
            Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not paths:
        raise UserError(
            f"no images found in --train_data_dir {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def open_path(path: Path) -> Image.Image:
    return Image.open(path)


def open_row(dataset: Any, column: str, row: int) -> Image.Image:
    """One row's image from a data set whose image column is not decoded by `datasets`."""
    value = dataset[row][column]
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, (np.ndarray, list)):
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    raise ValueError(f"column '{column}' holds {type(value).__name__}, not an image")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1


def load_image_dataset(cfg: TrainConfig) -> tuple[Any, Callable[[int], Image.Image]]:
    """The train split of --dataset_name (a saved local data set or a hub name) and a row -> image loader."""
    import datasets

    name = cfg.dataset_name
    path = Path(name).expanduser()
    if path.exists():
        dataset = load_local_dataset(path, cfg)
    elif looks_like_path(name):
        raise UserError(f"--dataset_name looks like a folder but does not exist: {name}")
    else:
        try:
            dataset = datasets.load_dataset(
                name, cfg.dataset_config_name, cache_dir=cfg.cache_dir, split="train"
            )
        except Exception as err:  # datasets raises many types here (connection, offline, not found, ...)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"could not load data set '{name}' ({reason}); the machine may be offline. "
                f"Use --train_data_dir with a folder of images, or --dataset_name with a data set saved by save_to_disk"
            ) from None
    if cfg.image_column not in dataset.column_names:
        raise UserError(
            f"data set '{name}' has no column '{cfg.image_column}' (set --image_column); "
            f"its columns: {', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns([cfg.image_column])
    if isinstance(dataset.features[cfg.image_column], datasets.Image):
        # Decode ourselves, so a corrupt row is reported (or skipped) instead of crashing the loader.
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    return dataset, partial(open_row, dataset, cfg.image_column)


def load_local_dataset(path: Path, cfg: TrainConfig) -> Any:
    """A data set saved by save_to_disk (Dataset, or DatasetDict -> 'train'), else a folder datasets can read."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        try:
            return datasets.load_dataset(
                str(path), cfg.dataset_config_name, cache_dir=cfg.cache_dir, split="train"
            )
        except Exception as err:  # any failure here means: not a data set we can read
            raise UserError(
                f"cannot read --dataset_name {path} as a data set: {str(err).splitlines()[0]}"
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"data set {path} has no 'train' split; its splits: {', '.join(loaded)}")
        return loaded["train"]
    return loaded


# ---- decoding, checking, transforms -------------------------------------------------------------------


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB'."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    if image.mode.startswith("I"):
        # 16-bit images (PNG 'I;16' / 'I'): PIL's own conversion to 8 bits would saturate them.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side equals `resolution`, keeping the aspect ratio."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.BILINEAR)


def decode(load: Callable[[Any], Image.Image], item: Any, channels: int, resolution: int,
           precise: bool = False) -> torch.Tensor:
    """Fully decode one image to a (C, H, W) tensor on the 0-255 scale whose shorter side is `resolution`.

    uint8, except 16-bit images with `precise` (--preserve_input_precision): float32, never rounded to 8 bits.
    """
    with load(item) as raw:
        image = raw.convert("F") if precise and raw.mode.startswith("I") else convert_mode(raw, channels)
        image.load()
    resized = resize_shorter_side(image, resolution)
    if image.mode == "F":
        array = np.asarray(resized, dtype=np.float32) / 257.0  # 0-65535 onto 0-255, keeping the fraction
        return torch.from_numpy(array.copy()).unsqueeze(0).repeat(channels, 1, 1)
    array = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(array.reshape(*array.shape[:2], channels).copy()).permute(2, 0, 1)


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 127.5 - 1.0


def crop(image: torch.Tensor, resolution: int, random: bool,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """A resolution x resolution crop, centred or at a random offset."""
    h, w = image.shape[-2:]
    if random:
        top = int(torch.randint(0, h - resolution + 1, (), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (), generator=generator))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    return image[:, top : top + resolution, left : left + resolution]


def check_images(
    items: Sequence[Any], load: Callable[[Any], Image.Image], cfg: TrainConfig, channels: int, limit: int
) -> tuple[list[Any], list[torch.Tensor], int]:
    """Decode items in order until `limit` good ones: (good items, their decoded tensors, number skipped)."""
    good, decoded, num_bad = [], [], 0
    for item in _progress(items, "decoding validation images"):
        if len(good) >= limit:
            break
        try:
            image = decode(load, item, channels, cfg.resolution, cfg.preserve_input_precision)
        except BAD_IMAGE_ERRORS as err:
            num_bad += _bad_image(item, err, cfg)
            continue
        good.append(item)
        decoded.append(image)
    return good, decoded, num_bad


BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def scan_images(items: Sequence[Any], load: Callable[[Any], Image.Image], cfg: TrainConfig,
                channels: int) -> tuple[list[Any], int]:
    """Every item's header, and a full decode of an even sample of them: (readable items, number skipped).

    Reading a header opens the file and parses its first bytes only, so a million-image folder is checked in
    minutes, not the hour a full decode would take; the sampled decodes catch a folder of the wrong kind early.
    """
    sample = set(np.linspace(0, len(items) - 1, min(len(items), NUM_SAMPLE_DECODES)).round().astype(int).tolist())
    good, num_bad = [], 0
    for i, item in enumerate(_progress(items, "checking images")):
        try:
            if i in sample:
                decode(load, item, channels, cfg.resolution, cfg.preserve_input_precision)
            else:
                with load(item) as image:
                    image.size  # noqa: B018  (PIL parses the header on open; size proves it is an image)
        except BAD_IMAGE_ERRORS as err:
            num_bad += _bad_image(item, err, cfg)
            continue
        good.append(item)
    return good, num_bad


def _bad_image(item: Any, err: Exception, cfg: TrainConfig) -> int:
    """A UserError, or 1 (skipped) with --skip_bad_images."""
    if not cfg.skip_bad_images:
        raise UserError(f"corrupt or unreadable image {describe(item, cfg)}: {err}. "
                        f"Fix or remove it, or pass --skip_bad_images")
    logger.warning("skipping unreadable image %s: %s", describe(item, cfg), err)
    return 1


def _progress(items: Sequence[Any], desc: str):
    from tqdm.auto import tqdm

    quiet = len(items) <= PROGRESS_MIN_IMAGES or int(os.environ.get("LOCAL_RANK", "0")) != 0
    return tqdm(items, desc=desc, disable=quiet, leave=False)


def describe(item: Any, cfg: TrainConfig) -> str:
    return str(item) if isinstance(item, Path) else f"row {item} of '{cfg.dataset_name}'"


class ImageItems(torch.utils.data.Dataset):
    """Images of a folder or data set, decoded per item (in DataLoader workers); a failing one is replaced.

    The replacement is the next readable item, so the batch keeps its size and a resumed run sees the same
    images. Failures are counted in `num_failed`, a shared-memory counter the training process reads on log steps
    (DataLoader workers are separate processes: an attribute set there would never reach the trainer).
    """

    def __init__(self, items, load, channels: int, cfg: TrainConfig) -> None:
        self.items, self.load, self.channels = items, load, channels
        self.resolution, self.random_crop, self.random_flip = (
            cfg.resolution,
            not cfg.center_crop,
            cfg.random_flip,
        )
        self.precise = cfg.preserve_input_precision
        self.describe = partial(describe, cfg=cfg)
        self.num_failed = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        i, generator = item_key(key)
        for attempt in range(MAX_SUBSTITUTIONS):
            item = self.items[(i + attempt) % len(self.items)]
            try:
                image = decode(self.load, item, self.channels, self.resolution, self.precise)
                break
            except BAD_IMAGE_ERRORS as err:
                self.num_failed += 1
                logger.warning("image failed to load during training, using the next one instead: %s: %s",
                               self.describe(item), err)
        else:
            raise RuntimeError(f"{MAX_SUBSTITUTIONS} images in a row failed to load, from {self.describe(item)}")
        image = crop(image, self.resolution, self.random_crop, generator)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return to_model_range(image)


def build_from_images(
    cfg: TrainConfig, channels: int, items: Sequence[Any], load: Callable[[Any], Image.Image], name: str
) -> DataBundle:
    """Hold out the last images (in sorted order) for validation and train on the rest, decoded lazily."""
    # At least one image must stay for training.
    wanted = DEFAULT_VALIDATION_IMAGES if cfg.num_validation_images is None else cfg.num_validation_images
    num_validation = max(0, min(wanted, len(items) - 1))
    if num_validation < wanted:
        logger.warning("only %d images: holding out %d for validation", len(items), num_validation)
    val_items, val_images, bad_val = check_images(items[::-1], load, cfg, channels, num_validation)
    first_val = len(items) - len(val_items) - bad_val
    limit = cfg.max_train_samples if cfg.max_train_samples is not None else len(items)
    train_items, bad_train = scan_images(items[:first_val][:limit], load, cfg, channels)
    if not train_items:
        raise UserError(
            f"no readable training images left in {name} after holding out {len(val_items)} for validation"
        )
    num_skipped = bad_val + bad_train
    if num_skipped:
        logger.warning("skipped %d unreadable images (--skip_bad_images)", num_skipped)
    validation = [to_model_range(crop(x, cfg.resolution, random=False)) for x in val_images[::-1]]
    empty = torch.zeros(0, channels, cfg.resolution, cfg.resolution)
    return DataBundle(
        train=ImageItems(train_items, load, channels, cfg),
        validation=torch.stack(validation) if validation else empty,
        name=name,
        num_skipped=num_skipped,
        in_memory=False,
    )


def num_loader_workers(requested: int | None, in_memory: bool, processes_per_node: int) -> int:
    """--dataloader_num_workers, or by default: none for data in memory, else the cores this process can spare."""
    if requested is not None:
        return requested
    if in_memory:
        return 0  # a worker would only add inter-process copies to an indexing operation
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, processes_per_node) - 1))


def num_failed_loads(dataset: torch.utils.data.Dataset) -> int:
    """Images that failed to load during training so far (0 for data held in memory)."""
    counter = getattr(dataset, "num_failed", None)
    return int(counter) if counter is not None else 0
