import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two xdist workers share two cores: one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The real Fashion-MNIST where Debian's package installed it, else a fixture in the same format."""
    if FASHION_MNIST.is_dir():
        return str(FASHION_MNIST)
    from softprune.data.fixtures import write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 1200), ("test", 400)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(root, images, labels, split)
    return str(root)
