"""Small helpers shared by the coders: their choice of implementation, and row reductions.

Each per-row coder (the lasso homotopy, OMP) has two implementations: numba
kernels compiled per row for the CPU (:mod:`.compiled`) and batched torch code
for other devices. :func:`coder_engine` picks between them.

torch's CPU ``argmax``/``argmin`` over the last dimension are several times
slower than numpy's vectorised ones on this kind of (rows, atoms) block, and
they sit in the inner loop of every greedy step of the torch coders, so on CPU
the reductions go through numpy views of the same memory (no copy). Other
devices use torch.
"""

from __future__ import annotations

import numpy as np
import torch

from .compiled import default_engine

__all__ = ["argmax_abs", "argmin_rows", "coder_engine"]

ENGINES = ("torch", "numba")


def coder_engine(engine, device, name):
    """The implementation a coder runs: ``engine``, or the default for ``device``.

    Parameters
    ----------
    engine : {"torch", "numba"} or None
        The caller's choice; None picks the compiled kernel ``name`` on the CPU
        (:func:`.compiled.default_engine`) and torch elsewhere, or when the
        kernel cannot be loaded (numba missing or broken).
    device : torch.device
        Where the coder's tensors are.
    name : str
        The compiled kernel's name in :mod:`.compiled` ("homotopy", "omp").

    Returns
    -------
    str
        ``"torch"`` or ``"numba"``.

    Raises
    ------
    ValueError
        For an engine other than ``"torch"``, ``"numba"`` or None.
    """
    if engine is None:
        return default_engine(device, name)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}.")
    return engine


def argmax_abs(c):
    """Per row, the first index of the largest ``|c|`` (numpy's ``argmax(abs(c))``)."""
    if c.device.type != "cpu":
        return c.abs().argmax(dim=1)
    a = c.detach().numpy()
    hi, lo = a.argmax(axis=1), a.argmin(axis=1)
    rows = np.arange(a.shape[0])
    top, bottom = a[rows, hi], -a[rows, lo]
    # Ties between the largest and the most negative entry keep the first index.
    pick = np.where(top > bottom, hi, np.where(bottom > top, lo, np.minimum(hi, lo)))
    return torch.from_numpy(pick)


def argmin_rows(c):
    """Per row, the smallest value and its first index (``c.min(dim=1)``)."""
    if c.device.type != "cpu":
        return c.min(dim=1)
    a = c.detach().numpy()
    i = a.argmin(axis=1)
    return torch.from_numpy(a[np.arange(a.shape[0]), i]), torch.from_numpy(i)

