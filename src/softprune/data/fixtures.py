"""Writers of tiny data sets in the real on-disk formats, for tests and demos that cannot download.

``write_idx`` writes MNIST-style IDX files, ``write_cifar_folder`` an official-style CIFAR python
folder and ``write_image_folder`` a train/val image folder of PNGs; the readers in
:mod:`softprune.data` read them back unchanged.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import SoftpruneError
from .cifar import CIFAR_FOLDERS, cifar_files
from .idx import IMAGES_MAGIC, LABELS_MAGIC

__all__ = ["write_cifar_folder", "write_idx", "write_idx_file", "write_image_folder"]

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def write_idx_file(path: str | Path, array: np.ndarray, magic: int, compress: bool = False) -> Path:
    """Write a uint8 array as one IDX file (gzip-compressed when ``compress``)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    if compress:
        # mtime=0 keeps the file byte-identical across runs.
        with gzip.GzipFile(path, "wb", mtime=0) as stream:
            stream.write(header + array.tobytes())
    else:
        path.write_bytes(header + array.tobytes())
    return path


def write_idx(
    root: str | Path, images: np.ndarray, labels: np.ndarray, split: str = "train", *, compress: bool = False
) -> tuple[Path, Path]:
    """Write the images and labels IDX files of one split ("train" or "test") into ``root``.

    ``images`` is uint8 [N, H, W] or [N, 1, H, W]; call once per split for the full set of four files.
    Names get ".gz" when ``compress``. Returns the (images, labels) paths.
    """
    if split not in _IDX_PREFIX:
        raise SoftpruneError(f"split must be 'train' or 'test', got {split!r}")
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    labels = np.asarray(labels)
    if images.ndim != 3 or labels.shape != (len(images),):
        raise SoftpruneError(
            f"write_idx needs images [N, H, W] (or [N, 1, H, W]) and labels [N], got {images.shape} and {labels.shape}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    prefix = _IDX_PREFIX[split]
    images_path = write_idx_file(root / f"{prefix}-images-idx3-ubyte{suffix}", images, IMAGES_MAGIC, compress)
    labels_path = write_idx_file(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, LABELS_MAGIC, compress)
    return images_path, labels_path


def _cifar_batch(
    images: np.ndarray, labels: np.ndarray, label_key: bytes, batch_label: str, start: int
) -> dict:
    batch = {
        b"batch_label": batch_label.encode(),
        label_key: [int(v) for v in labels],
        # Row-major CHW, 3072 bytes per image, as in the official files.
        b"data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8),
        b"filenames": [f"fixture_{start + i:06d}.png".encode() for i in range(len(images))],
    }
    if label_key == b"fine_labels":
        # Fixtures have no superclass table; readers use only the fine labels.
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return batch


def _check_cifar_arrays(images: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32) or labels.shape != (len(images),):
        raise SoftpruneError(
            f"write_cifar_folder needs {what} uint8 [N, 3, 32, 32] and labels [N], "
            f"got {images.dtype} {images.shape} and {labels.shape}"
        )
    return images, labels


def write_cifar_folder(
    root: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    cifar100: bool = False,
    *,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> Path:
    """Write an official-style CIFAR python folder under ``root`` and return its path.

    The training ``images`` (uint8 [N, 3, 32, 32]) are split over data_batch_1..5 (CIFAR-10) or stored in
    ``train`` (CIFAR-100); the test file holds ``test_images`` or, when not given, the training images.
    Files are dicts pickled with protocol 2, like the originals.
    """
    images, labels = _check_cifar_arrays(images, labels, "images")
    if test_images is None:
        test_images, test_labels = images, labels
    elif test_labels is None:
        raise SoftpruneError("write_cifar_folder got test_images without test_labels; pass both or neither")
    test_images, test_labels = _check_cifar_arrays(test_images, test_labels, "test_images")

    folder = Path(root) / CIFAR_FOLDERS[cifar100]
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"fine_labels" if cifar100 else b"labels"
    train_names = cifar_files(cifar100, "train")
    files: dict[str, dict] = {}
    start = 0
    for i, (chunk_x, chunk_y) in enumerate(
        zip(np.array_split(images, len(train_names)), np.array_split(labels, len(train_names)))
    ):
        label = "training batch" if cifar100 else f"training batch {i + 1} of 5"
        files[train_names[i]] = _cifar_batch(chunk_x, chunk_y, label_key, label, start)
        start += len(chunk_x)
    files[cifar_files(cifar100, "test")[0]] = _cifar_batch(
        test_images, test_labels, label_key, "testing batch 1 of 1", 0
    )
    num_classes = 100 if cifar100 else 10
    if cifar100:
        files["meta"] = {
            b"fine_label_names": [f"class_{i}".encode() for i in range(num_classes)],
            b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)],
        }
    else:
        files["batches.meta"] = {
            b"label_names": [f"class_{i}".encode() for i in range(num_classes)],
            b"num_cases_per_batch": len(files[train_names[0]][b"data"]),
            b"num_vis": 3 * 32 * 32,
        }
    for name, content in files.items():
        with open(folder / name, "wb") as stream:
            pickle.dump(content, stream, protocol=2)
    return folder


def write_image_folder(
    root: str | Path,
    classes: int = 3,
    per_class: dict[str, int] | None = None,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """``root/train/class_k/*.png`` and ``root/val/class_k/*.png``: RGB PNGs whose colour and a bright
    square's place depend on the class (learnable in a few steps), of varying sizes around ``size``."""
    from PIL import Image

    per_class = per_class or {"train": 8, "val": 4}
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
                image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                image[..., k % 3] += 120
                top = (k * h) // (classes + 1)
                image[top : top + h // 4, w // 4 : w // 2] = 250
                Image.fromarray(image).save(folder / f"{i}.png")
    return root
