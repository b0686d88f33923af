"""Data: digits, image folders of mixed modes and sizes, saved data sets, and every bad input as a UserError."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_optim.config import TrainConfig
from diffusers_optim.data import build_datasets
from diffusers_optim.digits import digits_split
from diffusers_optim.errors import UserError


def _cfg(**kwargs):
    kwargs.setdefault("resolution", 8)
    kwargs.setdefault("num_validation_images", 3)
    return TrainConfig(**kwargs)


def _all(dataset):
    return torch.stack([dataset[i] for i in range(len(dataset))])


# ---- digits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,resolution", [(1, 8), (1, 16), (3, 32)])
def test_digits_shapes_range_and_determinism(channels, resolution):
    cfg = _cfg(resolution=resolution, num_validation_images=10)
    a, b = build_datasets(cfg, channels), build_datasets(cfg, channels)
    split = digits_split()
    assert a.name == "digits" and a.num_skipped == 0
    assert len(a.train) == len(split["train_images"])
    assert a.train[0].shape == (channels, resolution, resolution) and a.train[0].dtype == torch.float32
    assert a.validation.shape == (10, channels, resolution, resolution)
    train = _all(a.train)
    for x in (train, a.validation):
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.9
    assert torch.equal(train, _all(b.train)) and torch.equal(a.validation, b.validation)
    if channels == 3:
        assert torch.equal(a.validation[:, 0], a.validation[:, 2])


def test_digits_validation_is_first_heldout_and_disjoint_from_train():
    bundle = build_datasets(_cfg(num_validation_images=50), 1)
    split = digits_split()
    np.testing.assert_allclose(
        bundle.validation[:, 0].numpy(), split["heldout_images"][:50] * 2 - 1, atol=1e-6
    )
    train = _all(bundle.train).flatten(1)
    val = bundle.validation.flatten(1)
    assert not (torch.cdist(val, train).min(dim=1).values == 0).any()


def test_digits_max_train_samples_and_flip():
    bundle = build_datasets(_cfg(max_train_samples=20, random_flip=True), 1)
    assert len(bundle.train) == 20
    torch.manual_seed(0)
    image = digits_split()["train_images"][0]
    seen = {tuple(bundle.train[0][0, 0].tolist()) for _ in range(40)}
    assert seen == {tuple(image[0] * 2 - 1), tuple(image[0, ::-1] * 2 - 1)}


def test_bad_channels():
    with pytest.raises(UserError, match="channels"):
        build_datasets(_cfg(), 2)


# ---- image folders ----------------------------------------------------------------------------------------


def _image(mode, size, seed):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE)
    return rgb.convert(mode)


def _folder(root, n=8):
    """n images of modes L/RGB/RGBA/P, various sizes, PNG and JPEG, some in nested folders."""
    modes = ["L", "RGB", "RGBA", "P"]
    sizes = [(12, 12), (20, 10), (9, 17), (32, 32)]
    paths = []
    for i in range(n):
        mode = modes[i % 4]
        ext = ".jpg" if mode in ("L", "RGB") and i % 3 == 0 else ".png"
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:02d}{ext}"
        _image(mode, sizes[i % 4], i).save(path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("center_crop", [True, False])
def test_folder_of_mixed_modes_and_sizes(tmp_path, channels, center_crop):
    _folder(tmp_path / "imgs")
    cfg = _cfg(train_data_dir=str(tmp_path / "imgs"), center_crop=center_crop, random_flip=True)
    bundle = build_datasets(cfg, channels)
    assert bundle.name == "imgs" and bundle.num_skipped == 0
    assert len(bundle.train) == 5 and bundle.validation.shape == (3, channels, 8, 8)
    for i in range(len(bundle.train)):
        x = bundle.train[i]
        assert x.shape == (channels, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1


def test_folder_validation_is_last_files_fixed_and_disjoint(tmp_path):
    paths = _folder(tmp_path / "imgs", n=10)
    cfg = _cfg(train_data_dir=str(tmp_path / "imgs"), center_crop=True, num_validation_images=4)
    bundle = build_datasets(cfg, 3)
    assert bundle.train.items == paths[:6]
    again = build_datasets(
        _cfg(train_data_dir=str(tmp_path / "imgs"), center_crop=True, num_validation_images=4, seed=7), 3
    )
    assert torch.equal(bundle.validation, again.validation)
    # The validation tensor is the last 4 files, in order: compare with a single-image folder of each.
    for k, path in enumerate(paths[6:]):
        single = tmp_path / f"single{k}"
        single.mkdir()
        (single / path.name).write_bytes(path.read_bytes())
        one = build_datasets(_cfg(train_data_dir=str(single), center_crop=True, num_validation_images=0), 3)
        assert torch.equal(one.train[0], bundle.validation[k])


def test_folder_max_train_samples(tmp_path):
    _folder(tmp_path / "imgs", n=8)
    bundle = build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs"), max_train_samples=2), 1)
    assert len(bundle.train) == 2 and len(bundle.validation) == 3


def test_folder_center_crop_is_the_middle(tmp_path):
    (tmp_path / "imgs").mkdir()
    array = np.zeros((8, 24), dtype=np.uint8)
    array[:, 8:16] = 255  # only the middle third is white
    Image.fromarray(array, "L").save(tmp_path / "imgs" / "wide.png")
    Image.fromarray(array, "L").save(tmp_path / "imgs" / "wide2.png")
    bundle = build_datasets(
        _cfg(train_data_dir=str(tmp_path / "imgs"), center_crop=True, num_validation_images=1), 1
    )
    assert torch.equal(bundle.train[0], torch.ones(1, 8, 8))
    assert torch.equal(bundle.validation[0], torch.ones(1, 8, 8))
    random_crop = build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs"), num_validation_images=1), 1)
    torch.manual_seed(0)
    means = {round(random_crop.train[0].mean().item(), 3) for _ in range(50)}
    assert len(means) > 3  # crops land at different offsets


def _truncated_png(path):
    _image("RGB", (32, 32), 0).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_png(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("make_bad", [_truncated_png, _random_png])
def test_corrupt_image_names_the_file(tmp_path, make_bad):
    _folder(tmp_path / "imgs", n=6)
    make_bad(tmp_path / "imgs" / "a" / "bad.png")
    with pytest.raises(UserError, match=r"bad\.png.*--skip_bad_images"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs")), 3)


def test_skip_bad_images_counts_them(tmp_path):
    _folder(tmp_path / "imgs", n=6)
    _truncated_png(tmp_path / "imgs" / "a" / "bad1.png")
    _random_png(tmp_path / "imgs" / "zz_bad2.png")  # sorts last: it would have been a validation image
    bundle = build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs"), skip_bad_images=True), 1)
    assert bundle.num_skipped == 2
    assert len(bundle.train) + len(bundle.validation) == 6 and len(bundle.validation) == 3
    assert all("bad" not in p.name for p in bundle.train.items)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "nope")), 1)


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(UserError, match="no images found"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "empty")), 1)


def test_folder_with_only_bad_images_when_skipping(tmp_path):
    (tmp_path / "imgs").mkdir()
    _random_png(tmp_path / "imgs" / "x.png")
    _random_png(tmp_path / "imgs" / "y.png")
    with pytest.raises(UserError, match="no readable training images"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs"), skip_bad_images=True), 1)


def test_unreadable_folder(tmp_path):
    folder = tmp_path / "locked"
    _folder(folder, n=4)
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK | os.X_OK):
            pytest.skip("running as root: permissions do not stop reading, so this cannot be tested here")
        with pytest.raises(UserError, match="not readable"):
            build_datasets(_cfg(train_data_dir=str(folder)), 1)
    finally:
        folder.chmod(0o755)


def test_unreadable_subfolder(tmp_path):
    _folder(tmp_path / "imgs", n=4)
    sub = tmp_path / "imgs" / "a"
    sub.chmod(0)
    try:
        if os.access(sub, os.R_OK | os.X_OK):
            pytest.skip("running as root: permissions do not stop reading, so this cannot be tested here")
        with pytest.raises(UserError, match="cannot read folder"):
            build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs")), 1)
    finally:
        sub.chmod(0o755)


def test_permission_errors_are_user_errors_when_root_reads_anyway(tmp_path, monkeypatch):
    """As root the chmod tests above skip; simulate the OS refusing, to check the messages still reach the user."""
    _folder(tmp_path / "imgs", n=4)
    real_access, real_scandir = os.access, os.scandir
    locked = tmp_path / "imgs"
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(UserError, match="not readable"):
        build_datasets(_cfg(train_data_dir=str(locked)), 1)
    monkeypatch.setattr(os, "access", real_access)

    def scandir(path):
        if Path(path) == locked / "a":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"cannot read folder .*imgs/a.*Permission denied"):
        build_datasets(_cfg(train_data_dir=str(locked)), 1)


def test_palette_transparency_and_16_bit_images_convert_without_warnings(tmp_path, recwarn):
    folder = tmp_path / "imgs"
    folder.mkdir()
    palette = _image("P", (10, 10), 0)
    palette.save(folder / "a_palette.png", transparency=bytes(range(0, 256, 16)))  # per-entry alpha, as bytes
    deep = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(deep).save(folder / "b_deep.png")
    _image("RGB", (10, 10), 1).save(folder / "c_rgb.png")
    bundle = build_datasets(_cfg(train_data_dir=str(folder), num_validation_images=1), 3)
    expected = torch.from_numpy(np.rint(deep / 257.0) / 127.5 - 1).float()
    # The 16-bit range maps onto [-1, 1] instead of saturating at 255.
    torch.testing.assert_close(bundle.train[1], expected.expand(3, 8, 8))
    assert not [w for w in recwarn if "PIL" in str(w.filename) or "Palette" in str(w.message)]


# ---- datasets data sets ---------------------------------------------------------------------------------------


def _saved_dataset(path, n=7, as_dict=True, column="image"):
    datasets = pytest.importorskip("datasets")
    images = [_image(["L", "RGB", "RGBA", "P"][i % 4], (10 + i, 12), i) for i in range(n)]
    ds = datasets.Dataset.from_dict({column: images, "label": list(range(n))})
    ds = ds.cast_column(column, datasets.Image())
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(path))
    return images


@pytest.mark.parametrize("as_dict", [True, False])
def test_local_saved_dataset(tmp_path, as_dict):
    _saved_dataset(tmp_path / "saved", as_dict=as_dict)
    bundle = build_datasets(_cfg(dataset_name=str(tmp_path / "saved"), center_crop=True), 3)
    assert bundle.name == "saved"
    assert len(bundle.train) == 4 and bundle.validation.shape == (3, 3, 8, 8)
    assert list(bundle.train.items) == [0, 1, 2, 3]
    x = _all(bundle.train)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_saved_dataset_with_corrupt_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "g.png"
    _image("RGB", (12, 12), 0).save(good)
    rows = [{"bytes": good.read_bytes(), "path": None}] * 5 + [{"bytes": b"not a png", "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="row 5"):
        build_datasets(_cfg(dataset_name=str(tmp_path / "saved")), 1)
    bundle = build_datasets(_cfg(dataset_name=str(tmp_path / "saved"), skip_bad_images=True), 1)
    assert bundle.num_skipped == 1 and len(bundle.train) + len(bundle.validation) == 5


def test_saved_dataset_without_the_image_column_lists_columns(tmp_path):
    _saved_dataset(tmp_path / "saved", column="img")
    with pytest.raises(UserError, match=r"no column 'image'.*img, label"):
        build_datasets(_cfg(dataset_name=str(tmp_path / "saved")), 1)
    bundle = build_datasets(_cfg(dataset_name=str(tmp_path / "saved"), image_column="img"), 1)
    assert len(bundle.train) == 4


def test_missing_local_dataset_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_datasets(_cfg(dataset_name=str(tmp_path / "nope")), 1)


def test_hub_dataset_offline_is_a_user_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variable at import time, so set their constants too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    cfg = _cfg(dataset_name="someone/some-images", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        UserError, match=r"could not load data set 'someone/some-images'.*offline.*--train_data_dir"
    ):
        build_datasets(cfg, 3)


def test_both_data_flags_are_an_error(tmp_path):
    """diffusers would silently ignore --train_data_dir; we ask which one is meant, before any scan."""
    _folder(tmp_path / "imgs", n=5)
    with pytest.raises(UserError, match="either --dataset_name or --train_data_dir, not both"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "imgs"), dataset_name="someone/x"), 1)


def test_preserve_input_precision_keeps_16_bit_levels(tmp_path):
    """Two 16-bit levels 1/65535 apart are one value after 8-bit rounding, two with --preserve_input_precision."""
    folder = tmp_path / "deep"
    folder.mkdir()
    for i, level in enumerate((30000, 30001, 30002)):
        Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(folder / f"{i}.png")
    coarse = build_datasets(_cfg(train_data_dir=str(folder), num_validation_images=0), 3)
    fine = build_datasets(_cfg(train_data_dir=str(folder), num_validation_images=0,
                               preserve_input_precision=True), 3)
    assert len({float(coarse.train[i].mean()) for i in range(3)}) == 1
    levels = [float(fine.train[i].mean()) for i in range(3)]
    assert levels == pytest.approx([lv / 65535 * 2 - 1 for lv in (30000, 30001, 30002)], abs=1e-6)
    assert fine.train[0].shape == (3, 8, 8)


@pytest.mark.parametrize("source", ["folder", "saved"])
def test_items_are_decoded_lazily_and_load_the_same_in_workers(tmp_path, source):
    from diffusers_optim.data import crop, decode, num_failed_loads, to_model_range

    if source == "folder":
        _folder(tmp_path / "src", n=8)
        cfg = _cfg(train_data_dir=str(tmp_path / "src"), center_crop=True)
    else:
        _saved_dataset(tmp_path / "src", n=8)
        cfg = _cfg(dataset_name=str(tmp_path / "src"), center_crop=True)
    data = build_datasets(cfg, 3)
    assert not data.in_memory and not hasattr(data.train, "cache")  # nothing decoded and kept up front
    expected = torch.stack([to_model_range(crop(decode(data.train.load, item, 3, 8), 8, random=False))
                            for item in data.train.items])
    assert torch.equal(_all(data.train), expected)
    loader = torch.utils.data.DataLoader(data.train, batch_size=5, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), expected)
    assert num_failed_loads(data.train) == 0


def _sized_folder(root, n):
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), i * 3 % 256, dtype=np.uint8)).save(root / f"img{i:03d}.png")


def _unsampled_training_image(n_train):
    """An index the pre-training check only reads the header of (not among its sampled full decodes)."""
    from diffusers_optim.data import NUM_SAMPLE_DECODES

    sampled = set(np.linspace(0, n_train - 1, NUM_SAMPLE_DECODES).round().astype(int).tolist())
    return next(i for i in range(n_train) if i not in sampled)


def test_a_file_that_is_no_image_fails_the_header_check_before_training(tmp_path):
    _sized_folder(tmp_path / "src", 100)
    bad = _unsampled_training_image(97)
    (tmp_path / "src" / f"img{bad:03d}.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=f"img{bad:03d}.png"):
        build_datasets(_cfg(train_data_dir=str(tmp_path / "src")), 3)
    data = build_datasets(_cfg(train_data_dir=str(tmp_path / "src"), skip_bad_images=True), 3)
    assert data.num_skipped == 1 and len(data.train) == 96


def test_an_image_failing_at_load_time_is_replaced_by_the_next_and_counted_across_workers(tmp_path):
    from diffusers_optim.data import num_failed_loads

    _sized_folder(tmp_path / "src", 100)
    bad = _unsampled_training_image(97)
    path = tmp_path / "src" / f"img{bad:03d}.png"
    path.write_bytes(path.read_bytes()[:-30])  # a truncated file: its header still reads
    data = build_datasets(_cfg(train_data_dir=str(tmp_path / "src"), center_crop=True), 3)
    assert len(data.train) == 97 and data.num_skipped == 0  # passed the header check
    loader = torch.utils.data.DataLoader(data.train, batch_size=10, num_workers=2)
    images = torch.cat(list(loader))
    assert num_failed_loads(data.train) == 1  # counted in a worker, seen here
    assert torch.equal(images[bad], images[bad + 1])  # replaced by the next image: the batch keeps its size


def test_loader_workers_default_to_none_in_memory_and_some_for_streamed_data():
    from diffusers_optim.data import num_loader_workers

    assert num_loader_workers(None, in_memory=True, processes_per_node=1) == 0
    assert 1 <= num_loader_workers(None, in_memory=False, processes_per_node=1) <= 8
    assert num_loader_workers(None, in_memory=False, processes_per_node=64) == 1
    assert num_loader_workers(3, in_memory=False, processes_per_node=1) == 3


def test_random_crop_and_flip_are_the_same_in_workers_after_a_restart_and_at_any_process_count(tmp_path):
    """Augmentation is seeded per item by BatchStream, not by a worker's RNG: resume stays exact."""
    from diffusers_optim.sampling import BatchStream

    root = tmp_path / "src"
    root.mkdir()
    for i in range(12):  # wider than tall, so a random crop has several positions
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 14, 3), dtype=np.uint8)).save(root / f"{i}.png")
    data = build_datasets(_cfg(train_data_dir=str(root), num_validation_images=2, random_flip=True), 3)

    def batches(workers, start=0, processes=1, rank=0, batch=2, n=6):
        stream = BatchStream(len(data.train), batch, processes, rank, seed=5, start=start)
        loader = torch.utils.data.DataLoader(data.train, batch_sampler=stream, num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    straight = batches(workers=0)
    assert all(torch.equal(a, b) for a, b in zip(straight, batches(workers=2)))
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], batches(workers=2, start=3, n=3)))
    # two processes at batch 1 see the halves of one process at batch 2
    halves = [batches(workers=0, processes=2, rank=r, batch=1) for r in range(2)]
    assert all(torch.equal(straight[k], torch.cat([halves[0][k], halves[1][k]])) for k in range(6))
    assert any(not torch.equal(x[0], x[0].flip(-1)) for x in straight)  # augmentation really happens
