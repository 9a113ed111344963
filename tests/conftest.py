import numpy as np
import pytest
import torch

# Tiny test models run fastest on one intra-op thread (and GridSearchCV tests
# start their own workers); keeps the suite light on the 2-core CI machine.
torch.set_num_threads(1)


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
