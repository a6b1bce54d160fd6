import os

import pytest
import torch

# Two xdist workers share two cores: one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
