import os

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels (sksae._accel.fused) run in Triton's interpreter, on CPU
# tensors: it must be chosen before Triton's first import (tests/test_triton.py). sparsify,
# a peer of the interop tests, takes its Triton decoder whenever Triton imports, CPU
# tensors included: without a GPU it runs its eager decoder, as it does without Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

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


@pytest.fixture
def small_store(tmp_path):
    """``(X, path)``: 100 float32 rows of 4 features, saved as a store of 30-row shards."""
    from sksae.activations import save_store

    X = np.random.RandomState(0).randn(100, 4).astype(np.float32)
    save_store(X, tmp_path / "s", dtype="float32", shard_rows=30)
    return X, tmp_path / "s"


@pytest.fixture
def tamper_shard():
    """``tamper(path, shard=2)``: flip a byte of a store's shard file (a value, not its header)."""
    def tamper(path, shard=2):
        file = path / "layer-000" / f"shard-{shard:06d}.npy"
        data = bytearray(file.read_bytes())
        data[-3] ^= 0xFF
        file.write_bytes(bytes(data))

    return tamper


@pytest.fixture
def chromium(tmp_path):
    """``run(*args)``: Debian's Chromium, headless, with a fresh profile under ``tmp_path``.

    Returns the ``subprocess.CompletedProcess`` (text output, console messages
    on stderr). A missing browser skips the test, and fails it in CI, where
    .ci/run installs the package.
    """
    import os
    import shutil
    import subprocess

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (.ci/run installs it)")

    def run(*args):
        return subprocess.run(
            [found, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=120)

    return run


# hypothesis profiles for tests/test_fuzz.py: "ci" (a fixed budget, derandomised so that
# CI runs are repeatable) by default; "long" with --hypothesis-profile=long
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_FUZZ_CHECKS)
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=_FUZZ_CHECKS)
settings.load_profile("ci")

