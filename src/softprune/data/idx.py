"""Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip-compressed).

An IDX file starts with a big-endian magic number 0x0000TTDD (TT = element type, 0x08 for unsigned
bytes; DD = number of dimensions), then one big-endian uint32 per dimension, then the data row-major.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import SoftpruneError

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "find_idx_files", "idx_search_dirs", "load_idx_split", "read_idx"]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_UBYTE = 0x08

# Torchvision's download layouts, checked after the root itself.
_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw")
_PREFIX = {"train": "train", "test": "t10k"}


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_exactly(stream: BinaryIO, count: int, path: Path, what: str) -> bytes:
    try:
        data = stream.read(count)
    except (OSError, EOFError) as exc:  # a cut-off gzip stream raises instead of returning short
        raise SoftpruneError(
            f"cannot read the {what} of IDX file {path}: {exc}; the file is damaged, fetch it again"
        ) from exc
    if len(data) != count:
        raise SoftpruneError(
            f"IDX file {path} is truncated: its {what} needs {count} bytes but only {len(data)} are there; "
            "fetch the file again"
        )
    return data


def read_idx(path: str | Path, expected_magic: int, limit: int | None = None) -> np.ndarray:
    """The array in an IDX file of unsigned bytes, keeping only the first ``limit`` items if given."""
    path = Path(path)
    with _open(path) as stream:
        header = _read_exactly(stream, 4, path, "header")
        (magic,) = struct.unpack(">I", header)
        if magic != expected_magic or header[2] != _UBYTE:
            kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
            raise SoftpruneError(
                f"{path} is not an IDX {kind} file: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; "
                "check that the file is an MNIST-format file and not damaged"
            )
        ndim = header[3]
        dims = list(struct.unpack(f">{ndim}I", _read_exactly(stream, 4 * ndim, path, "dimensions")))
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = int(np.prod(dims, dtype=np.int64))
        data = _read_exactly(stream, count, path, "data")
    # bytearray makes the array writable, which torch.from_numpy needs.
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(dims)


def idx_search_dirs(root: str | Path) -> list[Path]:
    """The folders searched for IDX files: the root, then torchvision's layouts under it."""
    root = Path(root)
    return [root / sub if sub else root for sub in _SUBDIRS]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(root: str | Path, split: str) -> tuple[Path, Path] | None:
    """Paths of the images and labels files of ``split`` ("train" or "test"), or None if not found."""
    prefix = _PREFIX[split]
    for folder in idx_search_dirs(root):
        images = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def load_idx_split(
    images_path: Path, labels_path: Path, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 1, H, W] and labels as int64 [N] from a pair of IDX files."""
    images = read_idx(images_path, IMAGES_MAGIC, limit)
    labels = read_idx(labels_path, LABELS_MAGIC, limit)
    if images.ndim != 3 or labels.ndim != 1:
        raise SoftpruneError(
            f"IDX images must have 3 dimensions and labels 1, got {images.ndim} in {images_path} and "
            f"{labels.ndim} in {labels_path}; use MNIST-format files"
        )
    if len(images) != len(labels):
        raise SoftpruneError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "the two files must come from the same split"
        )
    return images[:, None], labels.astype(np.int64)
