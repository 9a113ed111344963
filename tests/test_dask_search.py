"""Searches on a dask.distributed cluster: serial results, a worker's threads and device.

``dask[distributed]`` is in the ``test`` extra, so it is imported plainly: a
missing install fails here instead of skipping the cluster's coverage.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster, get_task_stream
from joblib import parallel_config
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sksae import SparseAutoencoder
from sksae._accel import cluster, device, threads
from sksae.activations import open_store, save_store
from sksae.datasets import make_sparse_superposition
from sksae.model_selection import dictionary_size_sweep


class _FakeWorker:
    def __init__(self, address, nthreads):
        self.address = address
        self.state = type("State", (), {"nthreads": nthreads})()


@pytest.fixture
def fake_worker(monkeypatch):
    """``use(address, nthreads)``: the calling thread now runs a task of that worker."""
    monkeypatch.setattr(cluster, "_index", {})

    def use(address="tcp://10.0.0.1:4000", nthreads=1):
        worker = _FakeWorker(address, nthreads)
        monkeypatch.setattr(cluster, "current_worker", lambda: worker)
        return worker

    return use


@pytest.fixture
def torch_threads():
    """``set(n)``: torch's intra-op thread count for the test, restored afterwards."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


def test_outside_a_worker_nothing_is_limited(torch_threads):
    torch_threads(2)
    assert cluster.current_worker() is None and cluster.worker_threads() is None
    assert cluster.worker_index() is None
    assert threads.granted() == 2
    with threads.serial(torch.zeros(1)):
        assert threads.serial_threads() == 2


@pytest.mark.parametrize("worker_threads, expected", [(1, 1), (2, 2), (3, 2)])
def test_a_fit_in_a_worker_takes_at_most_the_workers_threads(fake_worker, torch_threads,
                                                             worker_threads, expected):
    torch_threads(2)
    fake_worker(nthreads=worker_threads)
    x = torch.zeros(1)
    assert cluster.worker_threads() == worker_threads
    assert threads.granted() == expected
    assert threads.range_count(1000) == expected
    with threads.serial(x):
        assert threads.serial_threads() == expected
        assert torch.get_num_threads() == 1
        with threads.parallel(x):
            assert torch.get_num_threads() == expected
        with threads.parallel(x, own=True):
            assert threads.granted() == expected and torch.get_num_threads() == 1
        assert threads.range_count(1000) == expected
    assert torch.get_num_threads() == 2  # torch's own count is back after the fit


def test_each_worker_of_a_host_takes_its_own_device(fake_worker, monkeypatch):
    ranks = {"tcp://10.0.0.1:4000": 0, "tcp://10.0.0.1:4001": 1, "tcp://10.0.0.1:4002": 2}
    asked = []

    def rank(address):
        asked.append(address)
        return ranks[address]

    monkeypatch.setattr(cluster, "_rank_on_host", rank)
    monkeypatch.setattr(device, "_cuda_count", lambda: 2)
    for address, i in ranks.items():
        fake_worker(address)
        assert device.resolve_device("auto") == torch.device("cuda", i % 2)
        assert device.resolve_device(None) == torch.device("cuda", i % 2)
        assert device.resolve_device("cpu") == torch.device("cpu")  # an explicit choice stands
    assert asked == list(ranks)  # once per worker: the rank is kept
    fake_worker("tcp://10.0.0.1:4001")
    assert device.resolve_device("auto") == torch.device("cuda", 1) and len(asked) == 3

    monkeypatch.setattr(cluster, "current_worker", lambda: None)  # outside a worker
    assert device.resolve_device("auto") == torch.device("cuda")
    fake_worker("tcp://10.0.0.1:4002")
    monkeypatch.setattr(device, "_cuda_count", lambda: 1)  # one device: nothing to share
    assert device.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(device, "_cuda_count", lambda: 0)
    assert device.resolve_device("auto") == torch.device("cpu")


def test_importing_sksae_does_not_import_distributed():
    code = "import sys, sksae, sksae.model_selection; print('distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# --- a real cluster: two worker processes of one thread each -------------------------


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as local, Client(local) as c:
        yield c


@pytest.fixture(scope="module")
def data():
    return make_sparse_superposition(240, 12, 20, avg_active=3, random_state=0)


def _sae(**params):
    return SparseAutoencoder(n_components=16, k=2, max_iter=3, batch_size=48, device="cpu",
                             random_state=0, **params)


def test_grid_search_on_the_cluster_matches_the_serial_search(client, data):
    pipe = Pipeline([("scale", StandardScaler()), ("sae", _sae())])
    grid = {"sae__k": [1, 2, 4], "sae__n_components": [8, 24]}
    serial = GridSearchCV(pipe, grid, cv=2).fit(data)
    with get_task_stream(client) as stream, parallel_config(backend="dask"):
        on_cluster = GridSearchCV(pipe, grid, cv=2).fit(data)
    assert len(stream.data) > 0  # the fits ran on the workers
    assert on_cluster.best_params_ == serial.best_params_
    np.testing.assert_allclose(on_cluster.cv_results_["mean_test_score"],
                               serial.cv_results_["mean_test_score"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(on_cluster.best_estimator_[-1].components_,
                               serial.best_estimator_[-1].components_)


def test_grid_search_on_the_cluster_over_folds_of_a_lazy_store(client, data, tmp_path):
    """The workers get folds as row numbers of the store and read them where they run."""
    X = data.astype(np.float32)
    store = save_store(X, tmp_path / "s", dtype="float32", shard_rows=64)
    lazy = open_store(tmp_path / "s", indexing="lazy")
    grid = {"k": [1, 4]}
    serial = GridSearchCV(_sae(shuffle=False), grid, cv=2).fit(X)
    with get_task_stream(client) as stream, parallel_config(backend="dask"):
        on_cluster = GridSearchCV(_sae(shuffle=False), grid, cv=2).fit(lazy)
    assert len(stream.data) > 0 and store.shape == X.shape
    assert on_cluster.best_params_ == serial.best_params_
    np.testing.assert_allclose(on_cluster.cv_results_["mean_test_score"],
                               serial.cv_results_["mean_test_score"], rtol=1e-5, atol=1e-6)


def test_dictionary_size_sweep_on_the_cluster_matches_the_serial_sweep(client, data):
    sizes = [6, 12, 24]
    serial = dictionary_size_sweep(_sae(), data, sizes)
    with get_task_stream(client) as stream, parallel_config(backend="dask"):
        on_cluster = dictionary_size_sweep(_sae(), data, sizes)
    assert len(stream.data) > 0
    for key in ("fve", "l0", "dead_fraction", "duplicate_fraction", "mmcs_to_previous",
                "n_shared"):
        np.testing.assert_allclose(on_cluster[key], serial[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    for a, b in zip(on_cluster.estimators, serial.estimators):
        np.testing.assert_allclose(a.components_, b.components_, rtol=1e-6, atol=1e-7)


def _threads_in_task():
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # as if the worker's torch had more threads than the worker
    try:
        with threads.serial(torch.zeros(1)):
            inside = threads.serial_threads()
        return cluster.worker_threads(), threads.granted(), inside
    finally:
        torch.set_num_threads(n)


def _device_in_task():
    real = device._cuda_count
    device._cuda_count = lambda: 2  # as on a host with two GPUs
    try:
        return cluster.worker_index(), str(device.resolve_device("auto"))
    finally:
        device._cuda_count = real


def test_a_task_on_the_cluster_is_limited_to_its_workers_thread(client):
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    for address in workers:
        got = client.submit(_threads_in_task, workers=[address], pure=False).result()
        assert got == (1, 1, 1)


def test_the_workers_of_the_cluster_take_different_devices(client):
    workers = sorted(client.scheduler_info()["workers"])
    got = [client.submit(_device_in_task, workers=[a], pure=False).result() for a in workers]
    assert sorted(got) == [(0, "cuda:0"), (1, "cuda:1")]
    assert _device_in_task() == (None, "cuda")  # the client's process is no worker
