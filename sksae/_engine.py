"""The one minibatch loop both estimators use: batching, convergence, history, progress.

An estimator supplies ``step(batch) -> dict`` of 0-dim tensors (``"loss"`` is
required: the batch cost monitored for early stopping) and the engine runs it
over epochs. On accelerators metrics are pulled to the host every
``sync_every`` steps only, so the step loop never waits on the device; the
convergence rule is replayed step by step on the pulled values, so it gives the
same decisions as checking after every step (stopping may come up to
``sync_every - 1`` steps later). The metrics named in ``finite`` are checked
when they are pulled: a non-finite one raises
:class:`sksae.TrainingDivergedError` naming the step (the estimators put their
state back as it was before the call).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._accel.device import fits_on_device, host_read_interval
from ._accel.threads import serial
from ._base import TrainingDivergedError, as_tensor

__all__ = ["EarlyStopping", "BatchSource", "LoopResult", "LoopState", "run_minibatch_loop"]


class LoopResult(NamedTuple):
    """What :func:`run_minibatch_loop` ran.

    Attributes
    ----------
    n_steps : int
    n_epochs : float
        ``n_steps`` in epochs (fractional before rounding up).
    records : dict of ndarray
        Per-step values of every metric the step returned.
    stopped_early : bool
    """

    n_steps: int
    n_epochs: float
    records: dict
    stopped_early: bool


class LoopState(NamedTuple):
    """Where :func:`run_minibatch_loop` stands after ``n_steps`` steps: what resumes it.

    Attributes
    ----------
    n_steps : int
        Steps run by this call so far.
    records : dict of ndarray
        The metrics of those steps.
    stopper : dict or None
        :class:`EarlyStopping`'s counters.
    epoch_generator_state, generator_state : Tensor
        The source's generator at the start of the current epoch and now.
    """

    n_steps: int
    records: dict
    stopper: object
    epoch_generator_state: torch.Tensor
    generator_state: torch.Tensor


class EarlyStopping:
    """scikit-learn's minibatch convergence rule (``MiniBatchDictionaryLearning``).

    The first ``min(100, n_samples / batch_size)`` steps are ignored; an
    exponentially weighted average (EWA) of the batch cost with weight
    ``batch_size / (n_samples + 1)`` is tracked; training stops when the change
    of the monitored parameters is at most ``tol`` (if ``tol > 0``) or after
    ``max_no_improvement`` steps without a new EWA minimum.

    Parameters
    ----------
    n_samples : int
    batch_size : int
    tol : float
    max_no_improvement : int or None
    """

    def __init__(self, n_samples, batch_size, tol=0.0, max_no_improvement=10):
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.ewa_cost = None
        self.ewa_cost_min = None
        self.no_improvement = 0

    _COUNTERS = ("ewa_cost", "ewa_cost_min", "no_improvement")

    def state(self):
        """The counters, as a dict of numbers (None before the first update)."""
        return {k: getattr(self, k) for k in self._COUNTERS}

    def set_state(self, state):
        """Set the counters from :meth:`state`'s output."""
        for k in self._COUNTERS:
            setattr(self, k, state[k])

    def update(self, step, batch_cost, param_change=None):
        """Record step ``step`` (0-based); return True when training should stop."""
        step = step + 1
        if step <= min(100, self.n_samples / self.batch_size):
            return False
        if self.ewa_cost is None:
            self.ewa_cost = batch_cost
        else:
            a = min(self.batch_size / (self.n_samples + 1), 1.0)
            self.ewa_cost = self.ewa_cost * (1 - a) + batch_cost * a
        if self.tol > 0 and param_change is not None and param_change <= self.tol:
            return True
        if self.ewa_cost_min is None or self.ewa_cost < self.ewa_cost_min:
            self.no_improvement = 0
            self.ewa_cost_min = self.ewa_cost
        else:
            self.no_improvement += 1
        return (
            self.max_no_improvement is not None
            and self.no_improvement >= self.max_no_improvement
        )


class BatchSource:
    """Minibatches of rows of ``X`` as tensors on ``device``.

    On the CPU the batches are gathered from a zero-copy view of ``X``. On an
    accelerator ``X`` is moved once when it fits ``max_device_bytes``; otherwise
    each batch is gathered on the host into pinned memory and copied
    asynchronously.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    batch_size : int
    device : torch.device
    dtype : torch.dtype
    generator : torch.Generator
        CPU generator for the permutations (device independent).
    shuffle : {"epoch", "once", "none"}
        Reshuffle every epoch (SGD), shuffle once then cycle (scikit-learn's
        minibatch dictionary learning), or keep the order.
    scale : float, default=1.0
        Every batch is multiplied by ``scale`` (the same values as
        ``batch * scale``; on the CPU in place in the gathered batch, on one
        intra-op thread: a second one costs more than it saves on such a pass).
    group : sksae.distributed.Group or None
        Data-parallel training: the batches are this rank's parts
        (:meth:`~sksae.distributed.Group.part`) of the global batches one
        process would train on, drawn from the same generator.
    """

    def __init__(self, X, batch_size, device, dtype, generator, shuffle="epoch",
                 max_device_bytes=2 * 2**30, scale=1.0, group=None):
        self.group = group
        self.n_samples = X.shape[0]
        self.batch_size = min(batch_size, self.n_samples)
        self.device = device
        self.dtype = dtype
        self.generator = generator
        self.shuffle = shuffle
        self.scale = scale
        self._on_device = fits_on_device(X.nbytes, device, max_device_bytes)
        host = as_tensor(X, "cpu")
        self._data = as_tensor(host, device, dtype) if self._on_device else host
        self._order = None
        if shuffle == "once":
            self._order = torch.randperm(self.n_samples, generator=generator)

    @property
    def steps_per_epoch(self):
        return math.ceil(self.n_samples / self.batch_size)

    def rows_in_step(self, step):
        """Rows of the global batch of step ``step`` (counted from an epoch's start)."""
        return rows_in_step(self, step)

    def epoch(self, skip=0):
        """Yield the batches of one epoch (after its first ``skip``, drawn but not read)."""
        order = (torch.randperm(self.n_samples, generator=self.generator)
                 if self.shuffle == "epoch" else self._order)
        if order is not None and order.device != self._data.device:
            # one copy of the permutation per epoch: a copy from pageable host memory
            # per batch would wait for the device's queue to drain at every step
            order = order.to(self._data.device)
        for start in range(skip * self.batch_size, self.n_samples, self.batch_size):
            with serial(self._data):  # a gather on the CPU: one thread is enough
                batch = self._batch(order, start)
            yield batch

    def _batch(self, order, start):
        """Rows ``start:start + batch_size`` of the epoch's order, cast, moved and scaled."""
        stop = min(start + self.batch_size, self.n_samples)
        if self.group is not None:  # this rank's rows of the global batch
            lo, hi = self.group.part(stop - start)
            start, stop = start + lo, start + hi
        if order is None:
            batch, fresh = self._data[start:stop], False  # a view of the data
        else:
            batch, fresh = self._data.index_select(0, order[start:stop]), True
        if not self._on_device:
            # cast on the device: a copy that also casts would cast on the host, into
            # pageable memory, and then wait for its copy
            batch = batch.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
            fresh = True
        elif batch.dtype != self.dtype:
            batch, fresh = batch.to(self.dtype), True
        if self.scale != 1.0:
            batch = batch.mul_(self.scale) if fresh else batch * self.scale
        return batch


def rows_in_step(source, step):
    """Rows of the global batch of ``source``'s step ``step`` (an epoch's last may be short)."""
    j = step % source.steps_per_epoch
    return min(source.batch_size, source.n_samples - j * source.batch_size)


def _stack(values):
    """One host transfer for a list of scalar tensors (or floats)."""
    if isinstance(values[0], torch.Tensor):
        # stack first (promoting dtypes, exactly), then one conversion and one transfer
        return torch.stack([v.detach().reshape(()) for v in values]).double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


_WHAT = {"loss": "loss", "grad_norm": "gradient norm"}


def _diverged(desc, step, steps_per_epoch, metric, value, hint):
    """The :class:`TrainingDivergedError` of step ``step`` (counted from 1) of a call."""
    epoch = (step - 1) // steps_per_epoch + 1
    if metric == "parameters":
        what = "the parameters are no longer finite"
    else:
        what = f"the {_WHAT.get(metric, metric)} is {value}"
    message = (f"{desc} diverged at step {step} of this call (epoch {epoch}): {what}. "
               f"{hint}".rstrip())
    return TrainingDivergedError(message, step=step, metric=metric, value=value)


def _progress_bar(total, desc, verbose):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=verbose > 1, dynamic_ncols=True)


def run_minibatch_loop(step, source, *, max_epochs, stopper=None, callback=None,
                       verbose=0, desc="fit", sync_every=None, param_change=None,
                       postfix_keys=("loss",), finite=("loss",), state_finite=None,
                       divergence_hint="", start=None, checkpoint=None):
    """Run ``step`` over minibatches for at most ``max_epochs`` epochs.

    Parameters
    ----------
    step : callable
        ``step(batch, step_index, total_steps) -> dict`` of scalar tensors or
        floats; must contain ``"loss"``.
    source : BatchSource
    max_epochs : int
    stopper : EarlyStopping or None
    callback : callable or None
        Called as ``callback(locals_dict)`` after each step (scikit-learn's
        ``callback`` convention); returning False stops training.
    verbose : int
        0 silent; >= 1 a progress bar with live metrics.
    desc : str
    sync_every : int or None
        Steps between host synchronisations; 32 on accelerators by default, and
        on the CPU 1 when a ``callback`` or a ``stopper`` that can stop needs the
        values of each step, 32 otherwise (the records are the same).
    param_change : callable or None
        Returns the parameter change of the last step for ``stopper.tol``;
        forces a host sync each step when the stopper uses ``tol``.
    postfix_keys : tuple of str
        Metrics shown on the progress bar; ``"fvu"`` is shown as ``"fve"``
        (``1 - fvu``, also added to the records).
    finite : tuple of str, default=("loss",)
        Metrics that must be finite, checked when they are read (no extra
        host synchronisation).
    state_finite : callable or None
        ``state_finite() -> bool``: whether the trained parameters are all
        finite; called at each read of the metrics, after their check.
    divergence_hint : str
        Advice appended to the message of a divergence.
    start : LoopState or None
        Resume a call that stopped after ``start.n_steps`` steps: the
        records, the stopper's counters and the source's generator are put
        back, and the epoch in progress restarts at its next batch (the same
        batches as the uninterrupted call).
    checkpoint : object or None
        ``checkpoint.due(n_steps) -> bool`` is asked after each step; when it
        says so the metrics are pulled and ``checkpoint.write(state)`` gets
        the :class:`LoopState` of that moment.

    Returns
    -------
    result : LoopResult

    Raises
    ------
    sksae.TrainingDivergedError
        When a metric of ``finite`` is not finite, ``state_finite`` returns
        False, or ``step`` raises one (then named with its step here). The
        state trained by ``step`` is not restored here: that is the caller's.
    """
    steps_per_epoch = source.steps_per_epoch
    total = max_epochs * steps_per_epoch
    if stopper is not None and not (stopper.tol > 0 or stopper.max_no_improvement is not None):
        stopper = None  # it never stops: skip its per-step bookkeeping
    if sync_every is None:
        per_step = stopper is not None or callback is not None
        sync_every = host_read_interval(source.device, per_step)
    needs_change = stopper is not None and stopper.tol > 0 and param_change is not None
    if needs_change:
        sync_every = 1
    bar = _progress_bar(total, desc, verbose)
    pending, records = [], {}
    n_steps, stop = 0, False
    first_epoch, skip = 0, 0
    generator = getattr(source, "generator", None)
    if start is not None:
        n_steps = start.n_steps
        first_epoch, skip = divmod(n_steps, steps_per_epoch)
        records = {k: [np.asarray(v)] for k, v in start.records.items()}
        if stopper is not None and start.stopper is not None:
            stopper.set_state(start.stopper)
        if bar is not None:
            bar.update(n_steps)

    def flush():
        nonlocal stop
        if not pending:
            return
        # every step must report the same metric names, or the records misalign
        stacked = {k: _stack([p[1][k] for p in pending]) for k in pending[0][1]}
        check(stacked)
        if "fvu" in stacked and "fve" not in stacked:
            stacked["fve"] = 1.0 - stacked["fvu"]  # what users read: FVE = 1 - FVU
        for k, v in stacked.items():
            records.setdefault(k, []).append(v)
        for j, (i, _, change) in enumerate(pending):
            if stop:
                break
            if stopper is not None and stopper.update(i, float(stacked["loss"][j]), change):
                stop = True
        if bar is not None:
            bar.update(len(pending))
            shown = ("fve" if k == "fvu" else k for k in postfix_keys)
            bar.set_postfix({k: f"{stacked[k][-1]:.4g}" for k in shown if k in stacked})
        pending.clear()

    def check(stacked):
        bad = [(int(np.argmax(~np.isfinite(stacked[k]))), k) for k in finite
               if k in stacked and not np.isfinite(stacked[k]).all()]
        if bad:
            j, k = min(bad)
            raise _diverged(desc, pending[j][0] + 1, steps_per_epoch, k,
                            float(stacked[k][j]), divergence_hint)
        if state_finite is not None and not state_finite():
            raise _diverged(desc, pending[-1][0] + 1, steps_per_epoch, "parameters",
                            None, divergence_hint)

    def loop_state():
        flush()
        return LoopState(n_steps, {k: np.concatenate(v) for k, v in records.items()},
                         stopper.state() if stopper is not None else None,
                         epoch_state, generator.get_state())

    try:
        for epoch_index in range(first_epoch, max_epochs):
            restore = None
            if start is not None and epoch_index == first_epoch:
                generator.set_state(start.epoch_generator_state)
                restore = start.generator_state
            epoch_state = generator.get_state() if generator is not None else None
            for batch in source.epoch(skip if epoch_index == first_epoch else 0):
                if restore is not None:  # the epoch's draws are made: on from the saved state
                    generator.set_state(restore)
                    restore = None
                try:
                    metrics = step(batch, n_steps, total)
                except TrainingDivergedError as exc:
                    if exc.step is not None:
                        raise
                    flush()  # an earlier step may have diverged first
                    raise _diverged(desc, n_steps + 1, steps_per_epoch, exc.metric,
                                    exc.value, divergence_hint) from None
                change = param_change() if needs_change else None
                pending.append((n_steps, metrics, change))
                n_steps += 1
                if callback is not None and callback(locals()) is False:
                    stop = True
                if len(pending) >= sync_every or stop:
                    flush()
                if checkpoint is not None and not stop and checkpoint.due(n_steps):
                    checkpoint.write(loop_state())
                if stop:
                    break
            if stop:
                break
        flush()
    finally:
        if bar is not None:
            bar.close()
    records = {k: np.concatenate(v) for k, v in records.items()}
    return LoopResult(n_steps, n_steps / steps_per_epoch, records, stop)
