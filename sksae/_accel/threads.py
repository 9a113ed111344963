"""Intra-op threads of a CPU training step: one by default, more where measured faster.

A training step is a few dense operations (the encoder product, the top-k,
Adam) among many short memory-bound passes. On a quiet machine the dense ones
run faster on two threads than on one. On a machine whose cores are busy
with other work they can run many times *slower* on two: OpenMP threads spin
and wait for each other at every barrier, and one of them waits for the
scheduler (the user guide's performance notes give the measurements).

So the step runs on one thread (:func:`serial`) and each heavy operation (the
encoder product, the top-k, Adam, the sparse kernels' gathers, scatters,
sampled products and compiled passes; for DictionaryLearnerGPU each coder
call and dictionary update) asks :func:`parallel` for the faster of one
thread and all of them, measured on the previous calls at the same call site
and shape. The choice is re-measured now and then (less often while it keeps
being confirmed), so a fit follows the machine's load as it changes. Where an
operation's rows are independent (the encoder product, the top-k), the other
option is timed on a probe of its first rows instead of the whole call, so a
trial of a slower option costs a fraction of a call instead of a whole one. The thread count does not change results: the operations routed here
(MKL's GEMM split over output blocks, top-k, fused Adam, ``embedding_bag``
over bags, sampled products per entry, the compiled passes per latent range)
give the same bits on any number of threads, which ``tests/test_threads.py``
checks.

Operations whose work splits into independent ranges (rows of the encoder
product and of the top-k, bags of the decode, elements of Adam, latents of
the compiled passes) do not use torch's OpenMP threads at all: with
``own=True`` :func:`parallel` grants them threads of sksae's own pool and
leaves torch on one thread, and they run their ranges with
:func:`run_ranges`. The ranges are those of :func:`even_bounds`, fixed by
the thread count at the start of the fit; the choice only decides whether
they run one after another or at once, so it cannot change a bit. One pool
for all the step's parallel work matters on a small machine: after an
OpenMP region its idle worker keeps spinning for milliseconds (libgomp's
default wait policy), and any other thread shares a core with it; with every
part of the step on the one pool the OpenMP team never wakes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["serial", "parallel", "row_probe", "run_ranges", "even_bounds", "range_count",
           "granted", "serial_threads", "ThreadChooser"]

#: per Python thread: intra-op threads outside the outermost :func:`serial`
#: block (``outer`` absent outside), so that fits in concurrent threads keep apart
_state = threading.local()
#: one chooser per (call site, shape, dtype)
_choosers = {}
_MAX_CHOOSERS = 4096


class ThreadChooser:
    """Picks 1 or ``n`` threads for one call site from measured durations.

    Each option's duration is an exponentially weighted average of its recent
    calls; the faster one is used, and the other is tried again after
    ``explore`` calls. The interval doubles (up to ``max_explore``) each time a
    trial confirms the choice and falls back to ``min_explore`` when it
    changes it, so a much slower option costs little once known.

    Parameters
    ----------
    min_explore, max_explore : int
        Bounds of the number of calls between two trials of the other option.
    smoothing : float
        Weight of the newest duration in the running average.
    """

    def __init__(self, min_explore=8, max_explore=256, smoothing=0.3):
        self.min_explore = min_explore
        self.max_explore = max_explore
        self.smoothing = smoothing
        self.seconds = {}
        self.choice = None
        self.explore = min_explore
        self.since_trial = 0

    def pick(self, n):
        """Thread count for the next call, 1 or ``n``."""
        return self.pick_between(n, 1)

    def pick_between(self, first, second):
        """The option for the next call, ``first`` or ``second`` (any hashable labels)."""
        for option in (first, second):  # each option measured once before any choice
            if option not in self.seconds:
                return option
        if self.since_trial >= self.explore:
            return second if self.choice == first else first
        return self.choice

    def wants_timing(self, option):
        """Whether a call of ``option`` must be timed for the next choice.

        Every call until both options are known, the trials of the other
        option, and the call of the chosen one just before a trial (so that
        the two are compared on fresh numbers). Other calls may run untimed
        and are counted with :meth:`skip`.
        """
        return (self.choice is None or option != self.choice
                or self.since_trial + 1 >= self.explore)

    def skip(self):
        """Count an untimed call of the chosen option."""
        self.since_trial += 1

    def record(self, option, seconds):
        """Account one call of ``option`` threads that took ``seconds``."""
        old = self.seconds.get(option)
        trial = self.choice is not None and option != self.choice
        self.seconds[option] = (seconds if old is None or trial
                                else old + self.smoothing * (seconds - old))
        if len(self.seconds) < 2:
            return
        best = min(self.seconds, key=self.seconds.get)
        if trial:
            self.since_trial = 0
            self.explore = (self.min_explore if best != self.choice
                            else min(2 * self.explore, self.max_explore))
        else:
            self.since_trial += 1
        self.choice = best


@contextlib.contextmanager
def serial(t):
    """Run the block on one intra-op thread when ``t`` is on the CPU.

    Nested blocks are no-ops; :func:`parallel` inside may take threads back.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1 or serial_threads() is not None:
        yield
        return
    _state.outer = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _state.outer = None
        torch.set_num_threads(n)


@contextlib.contextmanager
def parallel(t, site, probe=None, fraction=None, own=False):
    """Inside a :func:`serial` block, run the block on the measured-faster thread count.

    Parameters
    ----------
    t : Tensor
        The operation's main operand: its device, shape and dtype key the
        measurements together with ``site``.
    site : str
        Name of the call site (e.g. ``"encoder product"``).
    probe : callable, optional
        Does ``fraction`` of the block's work (e.g. its first rows) into
        memory that the block then overwrites. With a probe, the option not in
        use is measured on the probe (its duration divided by ``fraction``)
        and the block runs on the current choice, so trying a slower option
        costs a fraction of a call. The probe's results are overwritten, so
        they never reach the output.
    fraction : float, optional
        The share of the block's work that ``probe`` does, in (0, 1].
    own : bool, default=False
        The block runs its work with :func:`run_ranges` (on the threads of
        sksae's pool) and torch stays on one thread; otherwise the choice is
        torch's intra-op thread count.
    """
    n = serial_threads()
    if n is None or t.device.type != "cpu":
        yield
        return
    key = (site, tuple(t.shape), t.dtype)
    chooser = _choosers.get(key)
    if chooser is None:
        if len(_choosers) >= _MAX_CHOOSERS:  # many distinct shapes: start over, bounded
            _choosers.clear()
        chooser = _choosers[key] = ThreadChooser()
    prev = torch.get_num_threads()  # 1, or the choice of an enclosing block
    option = chooser.pick(n)
    grant = _granting if own else _threads
    if probe is not None and chooser.seconds and option != _running(chooser):
        with grant(option, prev):
            start = time.perf_counter()
            probe()
            chooser.record(option, (time.perf_counter() - start) / fraction)
        option = chooser.pick(n)
    with grant(option, prev):
        start = time.perf_counter()
        try:
            yield
        finally:
            chooser.record(option, time.perf_counter() - start)


def row_probe(work, n_rows, share=8):
    """``(probe, fraction)`` for :func:`parallel` from ``work(m)``, the block's work on its first m rows.

    The probe does 1/``share`` of the rows (at least one).
    """
    m = max(1, n_rows // share)
    return (lambda: work(m)), m / max(n_rows, 1)


_pool = (0, None)
_pool_lock = threading.Lock()


def serial_threads():
    """Torch's thread count outside the enclosing :func:`serial` block, or None outside one."""
    return getattr(_state, "outer", None)


def granted():
    """Threads the ranges of :func:`run_ranges` may use now.

    The choice of the enclosing ``parallel(..., own=True)`` block; else
    torch's intra-op thread count (one inside a :func:`serial` block).
    """
    n = getattr(_state, "granted", None)
    return torch.get_num_threads() if n is None else n


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
    n = serial_threads() or torch.get_num_threads()
    return max(1, min(n, n_items // max(min_size, 1)))


def _running(chooser):
    """The option a call runs on when it is not a trial: the choice, else the one measured."""
    if chooser.choice is not None:
        return chooser.choice
    return next(iter(chooser.seconds))


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
