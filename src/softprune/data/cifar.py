"""CIFAR-10 and CIFAR-100 from the official python-pickle folders, unpickled with an allow-list.

The official batches are pickles of a dict holding a uint8 [N, 3072] array (row-major CHW) and a list of
labels. A pickle can name any callable, so the reader allows only the few numpy reconstructors those
files use and refuses everything else: a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import SoftpruneError

__all__ = [
    "CIFAR_FOLDERS",
    "cifar_files",
    "download_cifar",
    "load_cifar",
    "read_cifar_batch",
    "resolve_cifar_folder",
]

CIFAR_FOLDERS = {False: "cifar-10-batches-py", True: "cifar-100-python"}
_ARCHIVES = {False: "cifar-10-python.tar.gz", True: "cifar-100-python.tar.gz"}


def cifar_files(cifar100: bool, split: str) -> list[str]:
    """Names of the batch files of ``split`` ("train" or "test") inside the official folder."""
    if cifar100:
        return ["train"] if split == "train" else ["test"]
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


# numpy's array reconstructor, taken from a live array so neither the public alias numpy.core (deprecated
# in numpy 2) nor the private numpy._core has to be imported by name.
_reconstruct = np.empty(0).__reduce__()[0]


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals an official CIFAR batch refers to."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        # encoding="bytes": the official files were written by Python 2, whose str keys become bytes.
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            # Python 3 writes bytes in protocol 2 as _codecs.encode(text, "latin1").
            ("_codecs", "encode"): self._latin1_encode,
        }

    def _latin1_encode(self, text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
        # Only the latin-1 round trip that protocol 2 uses for bytes; other codecs are no CIFAR business.
        if codecs.lookup(encoding).name != "iso8859-1" or errors != "strict" or not isinstance(text, str):
            raise SoftpruneError(
                f"refusing to unpickle _codecs.encode(..., {encoding!r}) from {self._path}: not a CIFAR batch"
            )
        return text.encode("latin1")

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise SoftpruneError(f"refusing to unpickle {module}.{name} from {self._path}: not a CIFAR batch")
        return found


def read_cifar_batch(path: str | Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N] from one official batch file."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            batch = _CifarUnpickler(stream, path).load()
    except SoftpruneError:
        raise
    except (
        Exception
    ) as exc:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ValueError...)
        raise SoftpruneError(f"cannot read CIFAR batch {path}: {exc}; fetch the file again") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise SoftpruneError(
            f"{path} is not a CIFAR batch: expected a dict with keys b'data' and {label_key!r}; "
            "check that the folder holds the python version of the data set"
        )
    data, labels = batch[b"data"], batch[label_key]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        raise SoftpruneError(
            f"{path} is not a CIFAR batch: b'data' must be a uint8 array of shape [N, 3072], "
            f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise SoftpruneError(f"{path} is not a CIFAR batch: its {label_key!r} are not integers") from exc
    if labels.shape != (len(data),):
        raise SoftpruneError(
            f"{path} holds {len(data)} images but {labels.size} labels; fetch the file again"
        )
    return data.reshape(-1, 3, 32, 32), labels


def resolve_cifar_folder(root: str | Path, cifar100: bool) -> tuple[Path | None, list[Path]]:
    """The folder that holds the batch files (``root`` itself or the official folder under it) and the paths tried."""
    root = Path(root)
    candidates = [root, root / CIFAR_FOLDERS[cifar100]]
    names = cifar_files(cifar100, "train") + cifar_files(cifar100, "test")
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder, candidates
    return None, candidates


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (download errors list every mirror on its own line)."""
    return " ".join(str(exc).split())


def _archive_parent(root: str | Path, cifar100: bool) -> Path:
    """The folder the official archive extracts into, given either that folder's parent or the folder."""
    root = Path(root)
    return root.parent if root.name == CIFAR_FOLDERS[cifar100] else root


def download_cifar(root: str | Path, cifar100: bool) -> Path:
    """Download and extract the official archive (needs a network); returns the extracted folder."""
    # Imported here: only this rarely used path needs torchvision's download helpers.
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    folder_name = CIFAR_FOLDERS[cifar100]
    parent = _archive_parent(root, cifar100)
    source = CIFAR100 if cifar100 else CIFAR10
    # Only the verified download of torchvision is used; its own loader would unpickle without restriction.
    try:
        download_and_extract_archive(source.url, str(parent), filename=source.filename, md5=source.tgz_md5)
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as exc:
        raise SoftpruneError(
            f"downloading {_ARCHIVES[cifar100]} into {parent} failed ({one_line(exc)}); without a network, copy the archive "
            f"there and extract it so that {parent / folder_name} exists"
        ) from exc
    return parent / folder_name


def load_cifar(
    root: str | Path, cifar100: bool, split: str, limit: int | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one split, the first ``limit`` samples if given."""
    folder, looked = resolve_cifar_folder(root, cifar100)
    if folder is None and download:
        download_cifar(root, cifar100)
        folder, looked = resolve_cifar_folder(root, cifar100)
    if folder is None:
        archive = _ARCHIVES[cifar100]
        raise SoftpruneError(
            f"CIFAR-{100 if cifar100 else 10} not found: looked in {', '.join(str(p) for p in looked)}; "
            f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into "
            f"{_archive_parent(root, cifar100)}, "
            "or pass download=True where a network exists"
        )
    label_key = b"fine_labels" if cifar100 else b"labels"
    images, labels, kept = [], [], 0
    for name in cifar_files(cifar100, split):
        if limit is not None and kept >= limit:
            break
        batch_images, batch_labels = read_cifar_batch(folder / name, label_key)
        images.append(batch_images)
        labels.append(batch_labels)
        kept += len(batch_labels)
    images_array, labels_array = np.concatenate(images), np.concatenate(labels)
    if limit is not None:
        images_array, labels_array = images_array[:limit], labels_array[:limit]
    return np.ascontiguousarray(images_array), labels_array
