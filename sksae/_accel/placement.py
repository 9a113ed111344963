"""Where and in what shape an accelerator's sequential computations run.

DictionaryLearnerGPU's minibatch step holds two sequential computations: the
lasso path of each row (tens of events, each a few dozen small operations)
and the atom-by-atom dictionary sweep. On a GPU each small operation is a
kernel launch, and the path's bookkeeping a host synchronisation, so at
minibatch sizes the device mostly waits, while large batches (a ``transform``
of many rows) go the other way, as every launch then does much work. Neither
rule of thumb holds on every machine, so such a call site asks
:func:`run_faster` to run it where it has measured faster: the device's own
code, or the same computation on host copies (compiled per-row code or numpy
views), with the result copied back. The choice is made per call site and
shape by a :class:`Chooser` (both options
measured, the slower one retried less and less often). Both options compute
the same result up to floating-point rounding.

:func:`row_block` and :func:`array_views` hold the other device-dependent
choices of those computations: how many rows a batched step takes at once,
and whether a loop of small vector operations runs on numpy views (CPU) or
on the tensors themselves (an accelerator).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .device import is_accelerator, synchronize

__all__ = ["Chooser", "array_views", "row_block", "run_faster", "unit_ball"]

_choosers = {}
_MAX_CHOOSERS = 1024


class Chooser:
    """Picks the faster of two options for one call site from measured durations.

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

    def pick(self, first, second):
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


def _bucket(n):
    """Powers of two: calls of similar size share their measurements."""
    return 1 << max(0, int(n) - 1).bit_length()


def run_faster(site, t, on_device, on_host):
    """Run ``on_device()`` or ``on_host()``, whichever has measured faster here.

    Parameters
    ----------
    site : str
        Name of the call site.
    t : Tensor
        The computation's main operand: its device, shape (rows bucketed to
        powers of two) and dtype key the measurements with ``site``. On the CPU
        ``on_device()`` runs, unmeasured.
    on_device, on_host : callable
        Zero-argument callables computing the same result; ``on_host`` copies
        its inputs to the host and its result back to ``t``'s device.

    Returns
    -------
    The called function's return value.
    """
    if not is_accelerator(t.device):
        return on_device()
    shape = (_bucket(t.shape[0]), *t.shape[1:]) if t.ndim else ()
    key = (site, shape, t.dtype, str(t.device))
    chooser = _choosers.get(key)
    if chooser is None:
        if len(_choosers) >= _MAX_CHOOSERS:
            _choosers.clear()
        chooser = _choosers[key] = Chooser()
    option = chooser.pick("device", "host")
    run = on_device if option == "device" else on_host
    if not chooser.wants_timing(option):  # settled: no synchronisation
        chooser.skip()
        return run()
    synchronize(t.device)  # time this call only, not the work queued before it
    start = time.perf_counter()
    out = run()
    synchronize(t.device)
    chooser.record(option, time.perf_counter() - start)
    return out


def row_block(t, row_bytes, budget=4 * 2**20, min_rows=256):
    """Rows per block of a batched per-row computation on ``t``'s device.

    Parameters
    ----------
    t : Tensor
        The computation's (rows, ...) operand.
    row_bytes : int
        Bytes of the working set each row adds (its passes read and write it).
    budget : int, default=4 MiB
        Working set of one block on the CPU: a step makes several passes over
        it, which then stay in cache.
    min_rows : int, default=256
        Fewest rows of a CPU block, so that each step's calls still batch.

    Returns
    -------
    int
        All the rows on an accelerator (there every step is a few launches
        whatever the rows, so one block is fastest); on the CPU the largest
        count within ``budget``, at least ``min_rows``.
    """
    n = int(t.shape[0])
    if is_accelerator(t.device):
        return max(n, 1)
    return max(min_rows, int(budget) // max(1, int(row_bytes)))


def array_views(*tensors):
    """The tensors as the arrays a loop of small vector operations runs on fastest.

    Parameters
    ----------
    *tensors : Tensor
        Tensors of one device.

    Returns
    -------
    tuple
        On the CPU, numpy views of the same memory (writes through them change
        the tensors; a numpy call dispatches several times faster than a torch
        call, which dominates operations on vectors of a few hundred entries);
        elsewhere the tensors themselves (numpy cannot reach device memory).
        Code that uses only the operators both types share (``@``, ``+=``,
        slicing) and :func:`unit_ball` runs on either.
    """
    if tensors and is_accelerator(tensors[0].device):
        return tensors
    return tuple(t.detach().numpy() for t in tensors)


def unit_ball(v, positive=False):
    """Project a vector of :func:`array_views` onto the unit ball (and the orthant).

    Parameters
    ----------
    v : ndarray or Tensor of shape (n,)
        A numpy vector is projected in place; a tensor is not.
    positive : bool, default=False
        Clip negative entries to zero first.

    Returns
    -------
    ndarray or Tensor
        ``v / max(||v||, 1)``. On a device tensor the norm stays on the device
        (no host synchronisation); on numpy it is a host scalar, cheaper than
        numpy's scalar operations.
    """
    if isinstance(v, np.ndarray):
        if positive:
            np.maximum(v, 0, out=v)
        norm = math.sqrt(float(v @ v))
        if norm > 1.0:
            v /= norm
        return v
    if positive:
        v = v.clamp(min=0)
    return v / torch.linalg.vector_norm(v).clamp(min=1.0)
