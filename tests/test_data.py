"""Data set readers (IDX, CIFAR pickles), the data set registry and the batch loader."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from softprune.data import DATASETS, BatchLoader, ImageDataset, augment_batch, load_dataset, seeded_generator
from softprune.data.cifar import read_cifar_batch
from softprune.data.fixtures import write_cifar_folder, write_idx
from softprune.data.idx import IMAGES_MAGIC, LABELS_MAGIC, load_idx_split, read_idx
from softprune.errors import SoftpruneError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def random_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def random_cifar(n: int, seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    train_x, train_y = random_mnist(7, seed=1)
    test_x, test_y = random_mnist(3, seed=2)
    paths = write_idx(tmp_path, train_x, train_y, "train", compress=compress)
    write_idx(tmp_path, test_x, test_y, "test", compress=compress)
    assert all(p.name.endswith(".gz") == compress for p in paths)
    images, labels = load_idx_split(*paths)
    np.testing.assert_array_equal(images[:, 0], train_x)
    np.testing.assert_array_equal(labels, train_y.astype(np.int64))

    test = load_dataset("mnist", root=tmp_path, split="test")
    assert test.images.shape == (3, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], torch.from_numpy(test_x))
    assert torch.equal(test.labels, torch.from_numpy(test_y.astype(np.int64)))


def test_idx_found_in_torchvision_layout_and_limit(tmp_path):
    images, labels = random_mnist(6, seed=3)
    write_idx(tmp_path / "FashionMNIST" / "raw", images, labels, "train", compress=True)
    data = load_dataset("fashion_mnist", root=tmp_path, limit=4)
    assert len(data) == 4 and data.num_classes == 10 and data.name == "fashion_mnist"
    assert torch.equal(data.images[:, 0], torch.from_numpy(images[:4]))


def test_idx_bad_magic_names_the_file(tmp_path):
    images, labels = random_mnist(2, seed=4)
    images_path, labels_path = write_idx(tmp_path, images, labels, "train")
    with pytest.raises(SoftpruneError, match="magic number 0x00000801") as info:
        read_idx(labels_path, IMAGES_MAGIC)  # a labels file where images are expected
    assert str(labels_path) in str(info.value)
    images_path.write_bytes(b"\x12\x34" + images_path.read_bytes()[2:])
    with pytest.raises(SoftpruneError, match="0x12340803") as info:
        load_dataset("mnist", root=tmp_path)
    assert str(images_path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_file_raises(tmp_path, compress):
    images, labels = random_mnist(4, seed=5)
    images_path, _ = write_idx(tmp_path, images, labels, "train")
    data = images_path.read_bytes()[:-100]
    target = tmp_path / ("cut.gz" if compress else "cut")
    if compress:
        # A gzip stream cut short, as an interrupted download leaves it.
        target.write_bytes(gzip.compress(data + b"\0" * 100, mtime=0)[:-30])
    else:
        target.write_bytes(data)
    with pytest.raises(SoftpruneError, match="truncated|damaged") as info:
        read_idx(target, IMAGES_MAGIC)
    assert str(target) in str(info.value)
    # A header that promises more items than the labels file holds.
    _, labels_path = write_idx(tmp_path / "short", images, labels, "train")
    labels_path.write_bytes(labels_path.read_bytes()[:-1])
    with pytest.raises(SoftpruneError, match="truncated"):
        read_idx(labels_path, LABELS_MAGIC)


def test_idx_wrong_image_size_is_refused(tmp_path):
    write_idx(tmp_path, np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.uint8), "train")
    with pytest.raises(SoftpruneError, match="8x8"):
        load_dataset("mnist", root=tmp_path)


def test_missing_idx_lists_every_path(tmp_path):
    with pytest.raises(SoftpruneError) as info:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    message = str(info.value)
    for sub in ("", "raw", "MNIST/raw", "FashionMNIST/raw"):
        assert str(tmp_path / "nowhere" / sub) in message
    assert "apt-get install dataset-fashion-mnist" in message


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(("name", "cifar100", "classes"), [("cifar10", False, 10), ("cifar100", True, 100)])
def test_cifar_round_trip(tmp_path, name, cifar100, classes):
    train_x, train_y = random_cifar(12, seed=6, classes=classes)
    test_x, test_y = random_cifar(5, seed=7, classes=classes)
    folder = write_cifar_folder(tmp_path, train_x, train_y, cifar100, test_images=test_x, test_labels=test_y)
    assert folder.name == ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    for root in (tmp_path, folder):  # the folder itself or its parent
        train = load_dataset(name, root=root)
        assert train.num_classes == classes
        assert torch.equal(train.images, torch.from_numpy(train_x))
        assert torch.equal(train.labels, torch.from_numpy(train_y))
    test = load_dataset(name, root=folder, split="test")
    assert torch.equal(test.images, torch.from_numpy(test_x))
    assert torch.equal(test.labels, torch.from_numpy(test_y))
    limited = load_dataset(name, root=folder, limit=4)
    assert torch.equal(limited.images, torch.from_numpy(train_x[:4]))


def test_cifar_batches_are_official_dicts(tmp_path):
    images, labels = random_cifar(10, seed=8, classes=10)
    folder = write_cifar_folder(tmp_path, images, labels)
    with open(folder / "data_batch_1", "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    assert set(batch) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert batch[b"data"].shape == (2, 3072) and batch[b"data"].dtype == np.uint8
    # Row-major CHW: the first 1024 bytes are the red plane of the first image.
    np.testing.assert_array_equal(batch[b"data"][0, :1024], images[0, 0].reshape(-1))
    assert batch[b"labels"] == labels[:2].tolist()


def test_cifar_accepts_python2_numpy_module_name(tmp_path):
    # Files pickled by old numpy name numpy.core.multiarray; numpy 2 writes numpy._core.multiarray.
    images, labels = random_cifar(5, seed=9, classes=10)
    folder = write_cifar_folder(tmp_path, images, labels)
    path = folder / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data, read_labels = read_cifar_batch(path, b"labels")
    np.testing.assert_array_equal(data, images)
    np.testing.assert_array_equal(read_labels, labels)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


class _Rot13:
    def __reduce__(self):
        return (codecs.encode, ("abc", "rot13"))


def test_malicious_pickle_is_refused(tmp_path):
    images, labels = random_cifar(5, seed=10, classes=10)
    folder = write_cifar_folder(tmp_path, images, labels)
    marker = tmp_path / "pwned.txt"
    with open(folder / "data_batch_1", "wb") as stream:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, stream, protocol=2)
    with pytest.raises(SoftpruneError, match="refusing to unpickle .*system.*not a CIFAR batch") as info:
        load_dataset("cifar10", root=folder)
    assert str(folder / "data_batch_1") in str(info.value)
    assert not marker.exists()

    with open(folder / "test_batch", "wb") as stream:
        pickle.dump({b"data": _Rot13(), b"labels": []}, stream, protocol=2)
    with pytest.raises(SoftpruneError, match="rot13"):
        load_dataset("cifar10", root=folder, split="test")


def test_damaged_cifar_batch_names_the_file(tmp_path):
    images, labels = random_cifar(5, seed=11, classes=10)
    folder = write_cifar_folder(tmp_path, images, labels)
    path = folder / "data_batch_1"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(SoftpruneError, match="cannot read CIFAR batch") as info:
        load_dataset("cifar10", root=folder)
    assert str(path) in str(info.value)


def test_cifar_label_out_of_range_is_refused(tmp_path):
    images, _ = random_cifar(5, seed=12, classes=10)
    write_cifar_folder(tmp_path, images, np.array([0, 1, 2, 3, 12]))
    with pytest.raises(SoftpruneError, match="0..9"):
        load_dataset("cifar10", root=tmp_path)


def test_missing_cifar_says_where_it_looked(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(SoftpruneError) as info:
        load_dataset("cifar100", root=root)
    message = str(info.value)
    assert str(root) in message and str(root / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message and "download=True" in message


def test_unknown_dataset_and_bad_arguments():
    with pytest.raises(SoftpruneError) as info:
        load_dataset("cifar11")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(SoftpruneError, match="split"):
        load_dataset("cifar10", split="val")
    with pytest.raises(SoftpruneError, match="limit"):
        load_dataset("cifar10", limit=0)


# ---------------------------------------------------------------- the real Fashion-MNIST


def test_real_fashion_mnist():
    if not FASHION_ROOT.is_dir():
        pytest.skip(f"{FASHION_ROOT} is absent (apt-get install dataset-fashion-mnist)")
    train = load_dataset("fashion_mnist")
    test = load_dataset("fashion_mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.num_classes == 10
    assert torch.equal(torch.unique(train.labels), torch.arange(10))
    assert torch.equal(torch.unique(test.labels), torch.arange(10))
    # The registry's statistics must be those of the training pixels.
    pixels = train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(DATASETS["fashion_mnist"].mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(DATASETS["fashion_mnist"].std[0], abs=5e-4)


# ---------------------------------------------------------------- BatchLoader


def indexed_dataset(n: int, size: int = 8, channels: int = 3) -> ImageDataset:
    """Sample i has label i and every pixel equal to i, so a batch tells which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    return ImageDataset(images, torch.arange(n), n, (0.0,) * channels, (1.0,) * channels, "indexed")


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_epoch_covers_every_sample_once():
    loader = BatchLoader(indexed_dataset(10), 4, shuffle=True, augment=False)
    batches = collect(loader)
    assert len(batches) == len(loader) == loader.batches_per_epoch == 3
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.sort().values, torch.arange(10))
    assert not torch.equal(labels, torch.arange(10))  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        # Pixels were equal to the index, mean 0 and std 1: x * 255 gives the label back.
        torch.testing.assert_close(x[:, 0, 0, 0] * 255, y.float())


def test_ranks_partition_the_data():
    dataset = indexed_dataset(11)
    loaders = [BatchLoader(dataset, 3, shuffle=True, augment=False, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 2
    seen = [torch.cat([y for _, y in collect(loader)]) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 6
    both = torch.cat(seen)
    assert set(both.tolist()) == set(range(11))
    assert len(both) - len(set(both.tolist())) == 1  # 11 samples padded to 12 by wrapping once

    dropped = [
        BatchLoader(dataset, 2, shuffle=True, augment=False, rank=r, world_size=2, drop_last=True)
        for r in range(2)
    ]
    seen = [torch.cat([y for _, y in collect(loader)]) for loader in dropped]
    assert [len(s) for s in seen] == [4, 4]
    assert len(set(torch.cat(seen).tolist())) == 8


def test_order_is_a_function_of_seed_and_epoch():
    dataset = indexed_dataset(40)
    a = BatchLoader(dataset, 8, shuffle=True, augment=True, seed=3)
    b = BatchLoader(dataset, 8, shuffle=True, augment=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(collect(a), collect(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first = torch.cat([y for _, y in collect(a)])
    a.set_epoch(3)
    assert not torch.equal(first, torch.cat([y for _, y in collect(a)]))
    c = BatchLoader(dataset, 8, shuffle=True, augment=True, seed=4)
    c.set_epoch(2)
    assert not torch.equal(first, torch.cat([y for _, y in collect(c)]))


@pytest.mark.parametrize("start", [0, 1, 4, 7])
def test_iterate_from_a_batch_resumes_exactly(start):
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=rng, dtype=torch.uint8)
    dataset = ImageDataset(images, torch.arange(20) % 10, 10, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), "random")
    full = BatchLoader(dataset, 3, shuffle=True, augment=True, seed=5)
    full.set_epoch(1)
    reference = collect(full)
    assert len(reference) == 7
    # A fresh loader, as after a restart from a checkpoint taken after `start` batches.
    resumed = BatchLoader(dataset, 3, shuffle=True, augment=True, seed=5)
    resumed.set_epoch(1)
    rest = list(resumed.iterate(start_batch=start))
    assert len(rest) == 7 - start
    for (x, y), (xr, yr) in zip(rest, reference[start:], strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    with pytest.raises(SoftpruneError, match="start_batch"):
        resumed.iterate(start_batch=8)


def test_crop_of_white_image_has_at_most_four_zero_rows_and_cols():
    images = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    dataset = ImageDataset(images, torch.zeros(64, dtype=torch.int64), 10, (0.0,) * 3, (1.0,) * 3, "white")
    ((x, _),) = collect(BatchLoader(dataset, 64, shuffle=False, augment=True))
    assert x.shape == (64, 3, 32, 32)
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    zero_rows = (x == 0).all(dim=3).all(dim=1).sum(dim=1)  # per sample
    zero_cols = (x == 0).all(dim=2).all(dim=1).sum(dim=1)
    assert zero_rows.max().item() <= 4 and zero_cols.max().item() <= 4
    # The padding is the only source of zeros, and it lies on the border only.
    assert torch.equal(
        (x == 0).sum(dim=(1, 2, 3)), 3 * (32 * zero_rows + 32 * zero_cols - zero_rows * zero_cols)
    )
    assert (zero_rows > 0).any() and (zero_cols > 0).any()  # some crops did shift


def test_augment_is_a_window_of_the_padded_image_maybe_flipped():
    rng = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (32, 2, 6, 5), generator=rng, dtype=torch.uint8)
    out = augment_batch(images, seeded_generator(0, 0), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = []
    for i in range(len(images)):
        matches = [
            flip
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(
                out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy : dy + 6, dx : dx + 5])
            )
        ]
        assert len(matches) >= 1
        flips.append(matches[0])
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped samples occur


def test_normalization_uses_mean_and_std():
    images = torch.full((4, 3, 4, 4), 128, dtype=torch.uint8)
    images[2:] = 255
    mean, std = (128 / 255,) * 3, (0.25, 0.5, 0.125)
    dataset = ImageDataset(images, torch.zeros(4, dtype=torch.int64), 10, mean, std, "constant")
    ((x, _),) = collect(BatchLoader(dataset, 4, shuffle=False, augment=False))
    torch.testing.assert_close(x[:2], torch.zeros(2, 3, 4, 4), atol=1e-6, rtol=0)
    expected = torch.tensor([(1 - 128 / 255) / s for s in std]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(x[2:], expected)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 8, "drop_last": True}, "too few"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, pattern):
    options = {"batch_size": 2, "shuffle": False, "augment": False} | kwargs
    with pytest.raises(SoftpruneError, match=pattern):
        BatchLoader(indexed_dataset(5), **options)


def test_cutout_zeroes_one_square_per_image_and_is_reproducible():
    from softprune.data import cutout_batch, seeded_generator

    images = torch.ones(64, 2, 28, 28)
    out = cutout_batch(images.clone(), seeded_generator(0, 1), 12)
    holes = out[:, 0] == 0
    assert torch.equal(holes, out[:, 1] == 0)  # the same square in every channel
    area = holes.flatten(1).sum(1)
    assert int(area.max()) == 144 and int(area.min()) >= 36  # 12x12, clipped at the border to 6x6 at least
    rows, cols = holes.any(2), holes.any(1)
    assert torch.equal(holes, rows[:, :, None] & cols[:, None, :])  # a rectangle
    assert torch.equal(out, cutout_batch(images.clone(), seeded_generator(0, 1), 12))
