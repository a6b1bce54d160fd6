"""In-memory image data sets, image folders, and a resumable, rank-aware batch loader.

The small sets (CIFAR, MNIST, Fashion-MNIST) are built for small machines: a data set is held as one
uint8 tensor, and a batch is cut, augmented (random crop with zero padding, horizontal flip) and
normalized with a handful of whole-batch tensor operations, with no per-sample Python, no torchvision
transforms and no worker processes. An image folder is read from disk by worker processes
(data/folder.py) through the same loader, in the same order. Every random choice comes
from a generator seeded by (seed, epoch[, rank, batch]) so that a run resumed mid-epoch sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SoftpruneError, check_choice, choice_error
from .cifar import load_cifar, one_line
from .folder import ImageFolderSet, check_same_classes, folder_batches
from .idx import find_idx_files, idx_search_dirs, load_idx_split

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DatasetSpec",
    "ImageDataset",
    "ImageFolderSet",
    "augment_batch",
    "check_same_classes",
    "load_dataset",
    "seeded_generator",
]

SPLITS = ("train", "test")
FOLDER_IMAGE_SIZE = 224  # an image folder's side when none is given (ImageNet's)


@dataclass(frozen=True)
class DatasetSpec:
    """What softprune knows about a data set: shape, statistics, where it lives and how it is augmented."""

    name: str
    title: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_root: str
    # The paper's training augmentation: random 32x32 crop of the 4-pixel zero-padded image + flip.
    augment: bool
    source: str  # "cifar10", "cifar100" or "idx"
    how_to_get: str


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        "CIFAR-10",
        10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "./data/cifar-10-batches-py",
        True,
        "cifar10",
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        "into the folder's parent, or pass download=True where a network exists",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "CIFAR-100",
        100,
        3,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "./data/cifar-100-python",
        True,
        "cifar100",
        "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        "into the folder's parent, or pass download=True where a network exists",
    ),
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        10,
        1,
        28,
        (0.1307,),
        (0.3081,),
        "/usr/share/datasets/mnist",
        False,
        "idx",
        "put the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into the root, or pass download=True "
        "where a network exists",
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        "Fashion-MNIST",
        10,
        1,
        28,
        (0.2860,),
        (0.3530,),
        "/usr/share/datasets/fashion-mnist",
        False,
        "idx",
        "install it with `apt-get install dataset-fashion-mnist` (Debian; files land in "
        "/usr/share/datasets/fashion-mnist), or put the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist into the root, or pass download=True where a network exists",
    ),
}


@dataclass
class ImageDataset:
    """A whole split in memory: uint8 images [N, C, H, W], int64 labels [N] and the normalization statistics."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise SoftpruneError(
                f"dataset {self.name!r} images must be a uint8 tensor [N, C, H, W], "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise SoftpruneError(
                f"dataset {self.name!r} labels must be an int64 tensor [{len(self.images)}], "
                f"got {self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise SoftpruneError(
                f"dataset {self.name!r} needs one mean and one positive std per channel ({channels}), "
                f"got mean={self.mean} std={self.std}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SoftpruneError(f"limit must be a positive integer or None (all samples), got {limit!r}")
    return limit


def _download_idx(spec: DatasetSpec, root: Path, split: str) -> None:
    """Fetch MNIST-style files with torchvision (it writes root/MNIST/raw or root/FashionMNIST/raw)."""
    from torchvision.datasets import MNIST, FashionMNIST

    source = FashionMNIST if spec.name == "fashion_mnist" else MNIST
    try:
        source(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SoftpruneError(
            f"downloading {spec.title} into {root} failed ({one_line(exc)}); without a network, {spec.how_to_get}"
        ) from exc


def _load_idx(
    spec: DatasetSpec, root: Path, split: str, limit: int | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    found = find_idx_files(root, split)
    if found is None and download:
        _download_idx(spec, root, split)
        found = find_idx_files(root, split)
    if found is None:
        prefix = "train" if split == "train" else "t10k"
        looked = ", ".join(str(p) for p in idx_search_dirs(root))
        raise SoftpruneError(
            f"{spec.title} {split} files not found: looked for {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] in {looked}; {spec.how_to_get}"
        )
    images, labels = load_idx_split(*found, limit=limit)
    if images.shape[2:] != (spec.image_size, spec.image_size):
        raise SoftpruneError(
            f"{found[0]} holds {images.shape[2]}x{images.shape[3]} images but {spec.title} has "
            f"{spec.image_size}x{spec.image_size}; point root at the {spec.title} files"
        )
    return images, labels


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    limit: int | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> ImageDataset | ImageFolderSet:
    """Load one split of a registered data set into memory (the first ``limit`` samples when given),
    or open one of an image folder (``name="imagefolder"``: ``root/train``, ``root/val``; images
    read as batches are drawn, at ``image_size``, 224 by default; ``limit`` samples spread over
    the classes)."""
    check_choice("split", split, SPLITS)
    _check_limit(limit)
    if name == "imagefolder":
        if root is None:
            raise SoftpruneError(
                "data.name=imagefolder needs data.root: a folder holding train/<class>/ and val/<class>/"
            )
        return ImageFolderSet(root, split, image_size or FOLDER_IMAGE_SIZE, limit)
    spec = DATASETS.get(name)
    if spec is None:
        raise choice_error("dataset", name, [*DATASETS, "imagefolder"])
    root_path = Path(spec.default_root if root is None else root)
    if spec.source == "idx":
        images, labels = _load_idx(spec, root_path, split, limit, download)
    else:
        images, labels = load_cifar(root_path, spec.source == "cifar100", split, limit, download)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise SoftpruneError(
            f"{spec.title} labels must lie in 0..{spec.num_classes - 1}, found {labels.min()}..{labels.max()} "
            f"under {root_path}; the files belong to another data set or are damaged"
        )
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        name=spec.name,
    )


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed mixes all ``parts``, so (seed, epoch) and (seed, epoch + 1) are unrelated."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator()
    generator.manual_seed(int(state))
    return generator


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded images back to their size, then a random horizontal flip, per sample.

    ``images`` is uint8 [B, C, H, W] on any device; the random offsets come from the CPU ``generator``.
    """
    batch, _, height, width = images.shape
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offset_y[:, None] + torch.arange(height)
    cols = offset_x[:, None] + torch.arange(width)
    # Flipping a crop is reading its window's columns right to left, so the flip costs no extra pass.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    device = images.device
    sample = torch.arange(batch, device=device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: the result is [B, H, W, C].
    out = padded[sample, :, rows.to(device)[:, :, None], cols.to(device)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def cutout_batch(images: torch.Tensor, generator: torch.Generator, length: int) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017): per image, a ``length`` x ``length`` square centred at a
    random pixel (clipped at the border) is set to 0, after normalization, in place."""
    batch, _, height, width = images.shape
    cy = torch.randint(0, height, (batch,), generator=generator)
    cx = torch.randint(0, width, (batch,), generator=generator)
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    inside_y = (rows >= (cy - length // 2)[:, None]) & (rows < (cy - length // 2 + length)[:, None])
    inside_x = (cols >= (cx - length // 2)[:, None]) & (cols < (cx - length // 2 + length)[:, None])
    hole = (inside_y[:, :, None] & inside_x[:, None, :]).to(images.device)
    return images.masked_fill_(hole[:, None], 0.0)


class BatchLoader:
    """Batches of (normalized float32 images, int64 labels) for one rank, reproducible from (seed, epoch).

    The epoch order is one permutation shared by all ranks; rank r takes every world_size-th index from
    position r, after the order is padded by wrapping (or, with ``drop_last``, cut) to a multiple of
    world_size, so every rank gets the same number of batches.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        padding: int = 4,
        cutout: int = 0,
        workers: int = 0,
    ) -> None:
        for what, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SoftpruneError(f"{what} must be an integer >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise SoftpruneError(
                f"rank must be an integer in 0..{world_size - 1} for world_size={world_size}, got {rank!r}"
            )
        if padding < 0:
            raise SoftpruneError(f"padding must be >= 0, got {padding}")
        if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0:
            raise SoftpruneError(f"cutout must be an integer >= 0 (pixels), got {cutout!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise SoftpruneError(f"workers must be an integer >= 0 (processes), got {workers!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.padding = padding
        self.cutout = cutout
        self.workers = workers  # processes reading an image folder (in-memory sets need none)
        self.epoch = 0
        n = len(dataset)
        self.samples_per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        if self.batches_per_epoch == 0:
            raise SoftpruneError(
                f"dataset {dataset.name!r} has {n} samples, too few for one batch of {batch_size} on each of "
                f"{world_size} rank(s) with drop_last={drop_last}; use a smaller batch size or drop_last=False"
            )
        channels = dataset.channels
        std = torch.tensor(dataset.std, dtype=torch.float32).view(1, channels, 1, 1)
        mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, channels, 1, 1)
        # (x / 255 - mean) / std folded into one multiply and one subtract.
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise SoftpruneError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def rank_indices(self) -> torch.Tensor:
        """Dataset indices this rank visits in the current epoch, in order."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=seeded_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of the current epoch from ``start_batch`` on; earlier ones are never built."""
        if (
            isinstance(start_batch, bool)
            or not isinstance(start_batch, int)
            or not 0 <= start_batch <= len(self)
        ):
            raise SoftpruneError(f"start_batch must be an integer in 0..{len(self)}, got {start_batch!r}")
        # The epoch is bound now, so a set_epoch during the iteration cannot mix two epochs' augmentation.
        return self._batches(self.rank_indices(), self.epoch, start_batch)

    def _batches(
        self, indices: torch.Tensor, epoch: int, start_batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, ImageFolderSet):  # read from disk, transformed per image
            yield from folder_batches(self, indices, epoch, start_batch)
            return
        for batch in range(start_batch, self.batches_per_epoch):
            chosen = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = self.dataset.images[chosen].to(self.device, non_blocking=True)
            labels = self.dataset.labels[chosen].to(self.device, non_blocking=True)
            if self.augment:
                generator = seeded_generator(self.seed, epoch, self.rank, batch)
                images = augment_batch(images, generator, self.padding)
            images = images.float().mul_(self._scale).sub_(self._shift)
            if self.cutout:
                images = cutout_batch(
                    images, seeded_generator(self.seed, epoch, self.rank, batch, 1), self.cutout
                )
            yield images, labels
