"""Process-group set-up from the environment ``torchrun`` provides."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from .._accel.device import default_distributed_backend, use_local_gpu

__all__ = ["init_from_environment", "is_main_process"]


def init_from_environment(backend=None, timeout_s=600):
    """Initialise the default process group when launched by ``torchrun``; return whether it is.

    Does nothing (and returns False) outside a multi-process launch
    (``WORLD_SIZE`` unset or 1) or when a group already exists (then True).
    With an NCCL backend (the default where CUDA is available) it first
    makes ``cuda:{LOCAL_RANK}`` the process's current CUDA device, as NCCL's
    object collectives need.

    Parameters
    ----------
    backend : str or None
        None: NCCL for CUDA tensors where CUDA devices are available (and gloo
        for host tensors: ``"cpu:gloo,cuda:nccl"``), else gloo.
    timeout_s : float, default=600
        How long a collective may wait for the other ranks before it fails
        (so that a rank that died makes the others stop, not hang).

    Returns
    -------
    initialised : bool
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or default_distributed_backend()
    if "nccl" in backend:
        use_local_gpu()  # before any collective: NCCL binds each rank to its current GPU
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def is_main_process():
    """True on rank 0 of the default group, or without a process group (the rank that writes)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
