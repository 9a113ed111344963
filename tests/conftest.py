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


# hypothesis profiles for tests/test_fuzz.py: "ci" (a fixed budget, derandomised so that
# CI runs are repeatable) by default; "long" with --hypothesis-profile=long
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_FUZZ_CHECKS)
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=_FUZZ_CHECKS)
settings.load_profile("ci")

