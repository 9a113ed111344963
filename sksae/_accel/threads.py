"""Threads of a CPU training step: torch on one, the parallel work on sksae's own pool.

A training step is a few dense operations (the encoder product, the top-k,
Adam) among many short memory-bound passes. The step keeps torch on one
intra-op thread (:func:`serial`), and each heavy operation asks
:func:`parallel` for the fit's threads:

- operations whose work splits into independent ranges (rows of the encoder
  product and of the top-k, bags of the decode, elements of Adam, latents of
  the compiled passes) run their ranges on sksae's own worker threads with
  ``own=True`` (:func:`run_ranges`), torch staying on one thread in each. One
  pool for all the step's parallel work matters on a small machine: after an
  OpenMP region its idle worker keeps spinning for milliseconds (libgomp's
  default wait policy), and any other thread shares a core with it; with
  every part of the step on the one pool, the OpenMP team never wakes;
- the few that cannot be split so (MKL's sparse-dense product, a top-k over a
  whole flattened batch; for DictionaryLearnerGPU each coder call and
  dictionary update) get torch's threads back for their duration.

The ranges are those of :func:`even_bounds`, fixed by the fit's thread count,
and every operation routed here (MKL's GEMM split over output blocks, top-k,
fused Adam, ``embedding_bag`` over bags, sampled products per entry, the
compiled passes per latent range) gives the same bits on any number of
threads, which ``tests/test_threads.py`` checks.

The thread counts are per Python thread (a thread-local, as torch's own
intra-op setting is), so that fits in concurrent threads keep apart.
``benchmarks/bench_mechanisms.py`` measures what the pool is worth.

In a task of a ``dask.distributed`` worker (a search under
``joblib.parallel_config(backend="dask")``) the fit's thread count is at most
the worker's (:func:`sksae._accel.cluster.worker_threads`), its share of the
host's cores, whatever torch's own count in the worker's process.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .cluster import worker_threads

__all__ = ["serial", "parallel", "run_ranges", "even_bounds", "range_count", "granted",
           "serial_threads"]

#: per Python thread: intra-op threads outside the outermost :func:`serial`
#: block (``outer`` absent outside), so that fits in concurrent threads keep apart
_state = threading.local()


@contextlib.contextmanager
def serial(t):
    """Run the block on one intra-op thread when ``t`` is on the CPU.

    Nested blocks are no-ops; :func:`parallel` inside may take threads back:
    torch's count outside the block, at most the worker's in a dask task.

    Parameters
    ----------
    t : Tensor
        The block's main operand: nothing changes off the CPU.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1 or serial_threads() is not None:
        yield
        return
    _state.outer = _capped(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _state.outer = None
        torch.set_num_threads(n)


@contextlib.contextmanager
def parallel(t, own=False):
    """Inside a :func:`serial` block, run the block on the fit's threads.

    Parameters
    ----------
    t : Tensor
        The operation's main operand: nothing changes off the CPU.
    own : bool, default=False
        The block runs its work with :func:`run_ranges` (on the threads of
        sksae's pool) and torch stays on one thread; otherwise torch's
        intra-op thread count is the fit's for the block.
    """
    n = serial_threads()
    if n is None or t.device.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()  # 1, or the count of an enclosing block
    with (_granting if own else _threads)(n, prev):
        yield


_pool = (0, None)
_pool_lock = threading.Lock()


def serial_threads():
    """The fit's thread count inside a :func:`serial` block, or None outside one.

    Torch's count outside the block, at most the worker's in a dask task.
    """
    return getattr(_state, "outer", None)


def _capped(n):
    """``n`` threads, at most the threads of the dask worker running the current task."""
    limit = worker_threads()
    return n if limit is None else max(1, min(n, limit))


def granted():
    """Threads the ranges of :func:`run_ranges` may use now.

    The choice of the enclosing ``parallel(..., own=True)`` block; else
    torch's intra-op thread count (one inside a :func:`serial` block), at
    most the worker's in a task of a dask worker.
    """
    n = getattr(_state, "granted", None)
    if n is not None:
        return n
    n = torch.get_num_threads()
    return n if n == 1 else _capped(n)


def run_ranges(work, bounds):
    """Call ``work(a, b)`` for each consecutive range ``a:b`` of ``bounds``.

    For work that writes disjoint outputs per range and releases the GIL
    (compiled kernels, torch operations). With more than one thread
    :func:`granted`, the first range runs on the calling thread and the
    others at once on a shared pool of worker threads (created once, torch
    on one thread in each); with one, the ranges run one after another on
    the calling thread, so the results do not depend on the grant.
    """
    global _pool
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(ranges) <= 1 or granted() <= 1:
        for a, b in ranges:
            work(a, b)
        return
    with _pool_lock:
        if _pool[0] < len(ranges) - 1:
            _pool = (len(ranges) - 1, ThreadPoolExecutor(max_workers=len(ranges) - 1,
                                                         thread_name_prefix="sksae-kernel"))
        pool = _pool[1]
    inside = serial_threads() is not None
    futures = [pool.submit(_worker_call, work, a, b, inside) for a, b in ranges[1:]]
    try:
        work(*ranges[0])
    finally:
        for f in futures:
            f.result()


def _worker_call(work, a, b, inside):
    # torch work in a worker runs on that thread alone: a worker's own OpenMP
    # team would contend with the other ranges. Set from inside a serial block
    # only, where torch's process-wide default is already one thread.
    if inside and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    with torch.no_grad():  # grad mode is per thread; ranges never build graphs
        work(a, b)


def even_bounds(n_items, min_size=1):
    """Bounds of ranges of about equal size over ``n_items``, at least ``min_size`` each.

    One range per thread of the fit (the thread count outside the enclosing
    :func:`serial` block, else torch's), whatever the current grant, so that
    results do not depend on it; at least one range.
    """
    n = range_count(n_items, min_size)
    return [i * n_items // n for i in range(n + 1)]  # a list: numpy's linspace costs more than the step's use of it


def range_count(n_items, min_size=1):
    """How many ranges :func:`even_bounds` splits ``n_items`` into."""
    n = serial_threads() or _capped(torch.get_num_threads())
    return max(1, min(n, n_items // max(min_size, 1)))


@contextlib.contextmanager
def _granting(option, prev):
    # torch stays on ``prev`` threads; run_ranges reads the grant
    old = getattr(_state, "granted", None)
    _state.granted = option
    try:
        yield
    finally:
        _state.granted = old


@contextlib.contextmanager
def _threads(option, prev):
    if option != prev:
        torch.set_num_threads(option)
    try:
        yield
    finally:
        if option != prev:
            torch.set_num_threads(prev)
