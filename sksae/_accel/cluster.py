"""The dask.distributed worker a fit runs in, if any: its threads and its place on its host.

A search under ``joblib.parallel_config(backend="dask")`` runs each fit as a
task on a worker of a ``dask.distributed`` cluster. Two decisions follow the
worker rather than the machine:

- threads: a fit takes at most the worker's thread count (its share of the
  host's cores), however many torch would use (:mod:`sksae._accel.threads`
  asks :func:`worker_threads`);
- devices: on a host with several CUDA devices, the ``i``-th worker of the
  host takes device ``i % device_count`` for ``device="auto"``
  (:func:`sksae._accel.device.resolve_device` asks :func:`worker_index`).

``distributed`` is an optional dependency and is never imported here: code
runs in a worker only in a process that has imported it already.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["current_worker", "worker_threads", "worker_index"]

#: worker address -> its index among the workers of its host, computed once
_index = {}
_index_lock = threading.Lock()


def current_worker():
    """The ``distributed.Worker`` running the current task, or None outside one.

    Returns
    -------
    worker : distributed.Worker or None
        None when ``distributed`` is not imported, or when the calling thread
        runs no task of a worker (a worker's own tasks only: threads the task
        starts, such as sksae's kernel pool, are outside).
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except (ValueError, AttributeError):
        return None


def worker_threads():
    """The thread count of the dask worker running the current task, or None outside one.

    Returns
    -------
    n_threads : int or None
        The worker's ``nthreads`` (``dask worker --nthreads``,
        ``LocalCluster(threads_per_worker=...)``), at least 1.
    """
    worker = current_worker()
    if worker is None:
        return None
    state = getattr(worker, "state", None)
    n = getattr(state, "nthreads", None) or getattr(worker, "nthreads", None)
    return max(1, int(n)) if n else None


def worker_index():
    """The index of the current task's worker among the workers of its host, or None outside one.

    The workers of a host (those whose address has the same host part, as
    the scheduler lists them) are ranked by address; the rank is computed at
    the worker's first call and kept for its lifetime, so a worker keeps its
    device for all its fits.

    Returns
    -------
    index : int or None
        0 for the first worker of the host (and for a worker whose scheduler
        cannot be asked), None outside a worker.
    """
    worker = current_worker()
    if worker is None:
        return None
    address = worker.address
    with _index_lock:
        if address not in _index:
            _index[address] = _rank_on_host(address)
        return _index[address]


def _rank_on_host(address):
    from distributed import get_client
    from distributed.comm import get_address_host

    try:
        addresses = list(get_client().ncores())
    except Exception:  # an unreachable scheduler: the first device, not a failed fit
        return 0
    host = get_address_host(address)
    same = sorted(a for a in addresses if get_address_host(a) == host)
    return same.index(address) if address in same else 0
