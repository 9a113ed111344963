import os

import numpy as np
import pytest
import torch

# Keep the suite deterministic and light on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(params=_devices())
def device(request):
    """Every device available here: always the CPU, plus CUDA when present."""
    return request.param


@pytest.fixture
def rng():
    return np.random.RandomState(0)
