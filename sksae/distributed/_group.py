"""The process group a fit trains on, and the rows of a global batch each rank reads.

sksae does not write collectives of its own: :class:`Group` is a thin view of
a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs, as
``torchrun`` sets it up) with the few reductions the training step needs.
With one process (``group=None`` everywhere in the trainer) none of this
runs: the single-process step is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Group", "resolve_group", "BatchInfo", "GlobalRows", "check_data_parallel",
           "variance_from_sums", "shared_random_state"]


def variance_from_sums(squares, column_sums, n_rows):
    """``sum ||x_b - mean(x)||^2`` from ``sum ||x_b||^2`` and ``sum x_b`` over ``n_rows`` rows.

    In float64, at least 1e-12: the form that sums of several parts (chunks,
    ranks) can be combined in before the difference is taken.
    """
    mean = column_sums.double() / n_rows
    return (squares.double() - n_rows * torch.dot(mean, mean)).clamp_min(1e-12)


class BatchInfo:
    """The global batch a training step trains on.

    Attributes
    ----------
    n_rows : int
        Rows of the global batch (every rank's part together).
    group : Group or None
        None for one process.
    """

    __slots__ = ("n_rows", "group")

    def __init__(self, n_rows, group=None):
        self.n_rows = int(n_rows)
        self.group = group

    def row_mean(self, t):
        """The mean over the global batch of a per-row tensor, as this rank's share.

        Shares of every rank sum to the mean over the global batch; with one
        process it is ``t.mean()``.
        """
        if self.group is None:
            return t.mean()
        return t.sum() / self.n_rows

    def total_variance(self, e_BD):
        """``sum ||e_b - mean(e)||^2`` over the global batch (at least 1e-12), on every rank."""
        if self.group is None:
            return (e_BD - e_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        e = e_BD.double()
        parts = self.group.sum_(torch.cat([e.pow(2).sum().reshape(1), e.sum(0)]))
        return variance_from_sums(parts[0], parts[1:], self.n_rows).to(e_BD.dtype)


class Group:
    """One ``torch.distributed`` process group seen by a fit.

    Parameters
    ----------
    group : ProcessGroup or None
        None: the default (world) group.

    Attributes
    ----------
    rank, world_size : int
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, t):
        """All-reduce ``t`` in place by sum; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def min_(self, t):
        """All-reduce ``t`` in place by minimum; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def max_(self, t):
        """All-reduce ``t`` in place by maximum; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather(self, t):
        """Every rank's ``t`` (same shape on every rank), concatenated along dim 0 in rank order."""
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous(), group=self.group)
        return out

    def broadcast_(self, t, src=0):
        """Rank ``src``'s ``t`` into ``t`` on every rank; returns it."""
        dist.broadcast(t, src=self._global(src), group=self.group)
        return t

    def broadcast_object(self, obj, src=0):
        """Rank ``src``'s picklable ``obj`` on every rank (small host objects only)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def _global(self, rank):
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def part(self, n_rows, rank=None):
        """``(start, stop)``: the rows of a global batch of ``n_rows`` rows rank ``rank`` trains on.

        Contiguous parts as even as possible (the first ``n_rows % world``
        ranks take one row more), so that a ragged last batch is split too.
        """
        rank = self.rank if rank is None else rank
        base, extra = divmod(int(n_rows), self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def gather_object(self, value):
        """Every rank's picklable ``value``, a list in rank order (small host objects only)."""
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def check_same(self, what, value):
        """Raise on every rank unless every rank has the same (picklable) ``value``."""
        values = self.gather_object(value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the ranks of the process group disagree on {what}: "
                             f"{values}. Every rank must fit the same data with the "
                             "same parameters.")


def resolve_group(distributed, group=None):
    """The :class:`Group` a fit with ``distributed`` trains on, or None for one process.

    Parameters
    ----------
    distributed : {"auto", "data", "latent"} or bool or None
        ``"auto"``: data parallel when ``torch.distributed`` is initialised
        with more than one process, else single-process. ``"data"`` (or
        True) and ``"latent"`` require an initialised process group. False
        or None: single-process even inside a process group.
    """
    if distributed in (False, None):
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed == "auto":
            return None
        raise ValueError(
            f"distributed={distributed!r} needs an initialised torch.distributed process "
            "group (run under torchrun and call torch.distributed.init_process_group, or "
            "use `python -m sksae fit` under torchrun, which does).")
    g = Group(group)
    if distributed == "auto" and g.world_size == 1:
        return None
    return g


def shared_random_state(group, random_state):
    """``check_random_state(random_state)``, the same on every rank of ``group``.

    With ``random_state=None`` each process's global numpy state differs:
    every rank then draws from a copy of rank 0's, so that all draw the same
    batches and the same rows (a different draw per rank would desynchronise
    the collectives that follow). Without a group, or with a seed, as
    ``check_random_state``.
    """
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    if group is not None and random_state is None:
        rng = np.random.RandomState()
        rng.set_state(group.broadcast_object(check_random_state(None).get_state()))
    return rng


def check_data_parallel(group, estimator, n_samples, n_features, device=None):
    """Raise on every rank unless the ranks fit the same shape with the same parameters.

    With ``device`` (this rank's), also unless they train on one kind of device,
    each GPU its own (:func:`check_devices`).
    """
    batch_size = min(getattr(estimator, "batch_size", 1), n_samples)
    if batch_size < group.world_size:
        raise ValueError(
            f"data-parallel training cuts each batch into one part per rank: batch_size "
            f"({batch_size}) must be at least the number of processes ({group.world_size}).")
    _check_same_fit(group, estimator, n_samples, n_features, device)


class GlobalRows:
    """The rows of a global batch, read one at a time from the rank that holds each.

    Every rank must ask for the same rows in the same order (each read is a
    broadcast from the row's rank). Used where an update draws a random row
    of the batch (a dead atom's replacement in dictionary learning).

    Parameters
    ----------
    local : Tensor of shape (n_local, n_features)
        This rank's part of the batch.
    group : Group
    n_rows : int
        Rows of the global batch.
    """

    def __init__(self, local, group, n_rows):
        self.local = local
        self.group = group
        self.shape = (int(n_rows), local.shape[1])

    def __getitem__(self, i):
        i = int(i)
        owner = next(r for r in range(self.group.world_size)
                     if self.group.part(self.shape[0], r)[1] > i)
        start, _ = self.group.part(self.shape[0], owner)
        row = (self.local[i - start].clone() if owner == self.group.rank
               else self.local.new_empty(self.shape[1]))
        return self.group.broadcast_(row, src=owner)


def check_latent_sharded(group, estimator, n_samples, n_features, continuing, device=None):
    """Raise on every rank unless latent-sharded training can run this fit."""
    if estimator.architecture != "topk":
        raise ValueError(f"distributed='latent' trains architecture='topk' only, got "
                         f"{estimator.architecture!r}.")
    if estimator.resample_dead is not None:
        raise ValueError("distributed='latent' does not resample dead latents: set "
                         "resample_dead=None (AuxK revives them).")
    if continuing:
        raise ValueError("distributed='latent' trains with fit only, from scratch or from "
                         "a checkpoint_dir (not partial_fit nor warm_start).")
    _check_same_fit(group, estimator, n_samples, n_features, device)


def plain_params(estimator, skip=()):
    """The estimator's parameters as comparable plain values (arrays and RandomState by kind)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__)
            for k, v in estimator.get_params(deep=False).items() if k not in skip}


def _check_same_fit(group, estimator, n_samples, n_features, device=None):
    params = plain_params(estimator, ("callback", "verbose", "device"))
    group.check_same("the data's shape and the estimator's parameters",
                     (n_samples, n_features, sorted(params.items())))
    if device is not None:
        check_devices(group, device)


def check_devices(group, device):
    """Raise on every rank unless the ranks train on one kind of device, each GPU its own.

    Every rank of a machine on one GPU (``device="cuda:0"`` given to all)
    would fail inside NCCL ("Duplicate GPU detected") or share the GPU;
    ``device="auto"`` or ``"cuda"`` under ``torchrun`` is ``cuda:{LOCAL_RANK}``.
    """
    import socket

    device = torch.device(device)
    seen = group.gather_object((socket.gethostname(), device.type, device.index))
    kinds = sorted({kind for _, kind, _ in seen})
    if len(kinds) > 1:
        raise ValueError(f"the ranks of the process group train on different kinds of device "
                         f"({', '.join(kinds)}); give every rank the same device, e.g. "
                         "device='auto'.")
    places = {}
    for rank, (host, kind, index) in enumerate(seen):
        if kind == "cpu":
            continue
        other = places.setdefault((host, kind, index), rank)
        if other != rank:
            raise ValueError(
                f"ranks {other} and {rank} (host {host}) both train on {kind}:{index or 0}: "
                "each rank needs its own GPU. Under torchrun, device='auto' or 'cuda' is "
                "cuda:{LOCAL_RANK}.")
