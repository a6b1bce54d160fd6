"""Image folders (``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, the layout of ImageNet and
of most users' data), read from disk by torchvision's ImageFolder and a torch DataLoader with worker
processes.

The usual transforms: random resized crop and horizontal flip for training, resize to 1/0.875 of the
side and center crop for evaluation, then ImageNet's normalization. The order of an epoch is the
in-memory loader's (one seeded permutation shared by the ranks, each rank taking every world_size-th
index), and every sample's augmentation is drawn from a generator seeded by (seed, epoch, rank,
position): a run resumed in the middle of an epoch sees exactly the batches it would have seen, however
many workers load them. torch's DistributedSampler splits an epoch the same way but cannot start in the
middle of one, which is why the order is softprune's own here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import SoftpruneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
ERROR_PREFIX = "softprune.errors.SoftpruneError: "


class ImageFolderSet(torch.utils.data.Dataset):
    """One split of an image folder; ``dataset[(index, seed)]`` is (normalized image, label): the
    training transforms drawn from ``seed``, or the evaluation ones when ``seed`` is -1."""

    name = "imagefolder"
    channels = 3

    def __init__(self, root: str | Path, split: str, image_size: int, limit: int | None = None) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root)
        folder = next((root / f for f in SPLIT_FOLDERS[split] if (root / f).is_dir()), None)
        if folder is None:
            wanted = " or ".join(f"{root / f}/<class>/" for f in SPLIT_FOLDERS[split])
            raise SoftpruneError(
                f"image folder {str(root)!r} has no {split} split: expected {wanted} "
                "(one subfolder of images per class)"
            )
        try:
            self.folder = ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as exc:  # no class folders, or a class without images
            raise SoftpruneError(f"image folder {str(folder)!r}: {str(exc).splitlines()[0]}") from None
        self.root = folder
        self.classes = list(self.folder.classes)
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.indices = np.arange(len(self.folder.samples))
        if limit is not None and limit < len(self.indices):
            # evenly spaced over the folder, which lists the classes one after another: every class
            # keeps its share
            self.indices = (np.arange(limit) * len(self.indices)) // limit
        self._train, self._eval = _transforms(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.folder.samples[int(self.indices[index])]
        try:
            image = self.folder.loader(path)
        except Exception as exc:  # PIL raises several types for a broken file
            raise SoftpruneError(f"cannot read image {path!r} ({type(exc).__name__}: {exc})") from None
        if seed < 0:
            return self._eval(image), label
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's global generator
            torch.manual_seed(seed)
            return self._train(image), label


def _transforms(size: int):
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    evaluate = v2.Compose([v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size), *tail])
    return train, evaluate


def check_same_classes(train: ImageFolderSet, test: ImageFolderSet) -> None:
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise SoftpruneError(
            f"{str(train.root)!r} and {str(test.root)!r} must hold the same class folders; "
            f"{len(only)} differ, first {only[0]!r}"
            if only
            else f"{str(train.root)!r} and {str(test.root)!r} list their classes in different orders"
        )


def sample_seeds(seed: int, epoch: int, rank: int, count: int) -> np.ndarray:
    """One seed per position of a rank's epoch (the augmentation of its sample)."""
    state = np.random.SeedSequence([seed, epoch, rank, 2]).generate_state(1, dtype=np.uint64)[0]
    return np.random.default_rng(int(state)).integers(0, 2**62, size=count)


def folder_batches(
    loader, indices: torch.Tensor, epoch: int, start_batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of ``loader`` (a BatchLoader over an ImageFolderSet) from ``start_batch`` on, read
    by a DataLoader with ``loader.workers`` processes."""
    from . import cutout_batch, seeded_generator

    seeds = sample_seeds(loader.seed, epoch, loader.rank, len(indices))
    if not loader.augment:
        seeds[:] = -1
    first, last = start_batch * loader.batch_size, loader.batches_per_epoch * loader.batch_size
    keys = [(int(i), int(s)) for i, s in zip(indices[first:last].tolist(), seeds[first:last])]
    reader = torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=keys,
        num_workers=loader.workers,
        pin_memory=loader.device.type == "cuda",
    )
    try:
        for batch, (images, labels) in enumerate(reader, start_batch):
            images = images.to(loader.device, non_blocking=True)
            if loader.cutout:
                images = cutout_batch(
                    images, seeded_generator(loader.seed, epoch, loader.rank, batch, 1), loader.cutout
                )
            yield images, labels.to(loader.device, non_blocking=True)
    except SoftpruneError as exc:  # from a worker: its message carries the worker's traceback
        lines = [line for line in str(exc).splitlines() if line.startswith(ERROR_PREFIX)]
        raise SoftpruneError(lines[-1][len(ERROR_PREFIX) :] if lines else str(exc)) from None
