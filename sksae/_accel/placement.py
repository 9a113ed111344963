"""Where a sequential computation of an accelerator's fit runs: on the device or the host.

DictionaryLearnerGPU's minibatch step holds two sequential computations: the
lasso path of each row (tens of events, each a few dozen small operations)
and the atom-by-atom dictionary sweep. On a GPU each small operation is a
kernel launch, and the path's bookkeeping a host synchronisation, so at
minibatch sizes the device mostly waits: measured on an H200, a 256-row step
of the toy benchmark took 190 ms there against ~45 ms for the whole step on
two CPU cores. Large batches (a ``transform`` of many rows) go the other way,
as every launch then does much work. Neither rule of thumb holds on every
machine, so such a call site asks :func:`run_faster` to run it where it has
measured faster: the device's own code, or the same computation on host
copies (numpy or compiled per-row code), with the result copied back. The
choice is made per call site and shape by :class:`sksae._accel.threads.ThreadChooser`'s
rule (both options measured, the slower one retried less and less often).
Both options compute the same result up to floating-point rounding.
"""

from __future__ import annotations

import time

from .device import is_accelerator, synchronize
from .threads import ThreadChooser

__all__ = ["run_faster"]

_choosers = {}
_MAX_CHOOSERS = 1024


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
        chooser = _choosers[key] = ThreadChooser()
    option = chooser.pick_between("device", "host")
    synchronize(t.device)  # time this call only, not the work queued before it
    start = time.perf_counter()
    out = on_device() if option == "device" else on_host()
    synchronize(t.device)
    chooser.record(option, time.perf_counter() - start)
    return out
