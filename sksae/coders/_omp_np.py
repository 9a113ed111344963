"""The OMP block of :mod:`._omp`, step for step, with numpy for the small algebra (CPU).

Same algorithm and stopping rules as :func:`sksae.coders._omp._omp_block`. On
CPU, torch's batched products of many tiny matrices (``bmm`` over (rows, s, s))
and its row reductions cost several times numpy's, so those run in numpy on
zero-copy views; the weighted sums of Gram rows stay torch ``embedding_bag``
calls, one per L2-sized column panel of the Gram matrix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._accel.ops import argmax_abs

__all__ = ["omp_block_np"]


def omp_block_np(C, G, k, panels, code):
    """OMP on one block of rows of CPU tensors; writes the codes into ``code``."""
    n, K = C.shape
    G, C = G.detach(), C.detach()
    Gn, Cn = G.numpy(), C.numpy()
    dt = Gn.dtype
    eps = np.finfo(dt).eps
    # Correlations with the residual (row-major: numpy's row argmax is 4x faster
    # over whole rows than over panel-major blocks, which outweighs the strided
    # panel updates).
    R = C.clone()
    Rn = R.numpy()
    Linv = np.zeros((n, k, k), dtype=dt)
    z = np.zeros((n, k), dtype=dt)
    idx = np.zeros((n, k), dtype=np.int64)
    weights = np.zeros((n, k), dtype=dt)
    live = np.ones(n, dtype=bool)
    gdiag = np.ascontiguousarray(Gn.diagonal())
    rows = np.arange(n)
    idx_t, w_t = torch.from_numpy(idx), torch.from_numpy(weights)
    n_active = 0
    for s in range(k):
        lam = argmax_abs(R).numpy()
        picked = Rn[rows, lam]
        c_new = Cn[rows, lam]
        stop = picked * picked < eps
        if s > 0:
            stop |= (idx[:, :s] == lam[:, None]).any(axis=1)
            # l = L^{-1} G[A, lam], y = L^{-T} l
            Lm = Linv[:, :s, :s]
            g = Gn[idx[:, :s], lam[:, None]]
            l = np.matmul(Lm, g[:, :, None])[:, :, 0]
            lkk = gdiag[lam] - (l * l).sum(axis=1)
            stop |= lkk <= eps
            y = np.matmul(l[:, None, :], Lm)[:, 0]
            c_new = c_new - (l * z[:, :s]).sum(axis=1)
        else:
            lkk = gdiag[lam]
        live &= ~stop
        if not live.any():
            break
        # Rows that stopped get zero weights: no correlation change, zero coefficient.
        inv = np.where(live, 1.0 / np.sqrt(np.maximum(lkk, eps)), 0.0).astype(dt)
        idx[:, s] = np.where(live, lam, 0)
        weights[:, s] = inv
        Linv[:, s, s] = inv
        if s > 0:
            weights[:, :s] = y * -inv[:, None]
            Linv[:, s, :s] = weights[:, :s]
        zs = c_new * inv
        z[:, s] = zs
        ww = w_t[:, :s + 1] * torch.from_numpy(zs)[:, None]
        for lo, panel in panels:
            R[:, lo:lo + panel.shape[1]].sub_(
                F.embedding_bag(idx_t[:, :s + 1], panel, per_sample_weights=ww, mode="sum"))
        n_active = s + 1
    if n_active:
        m = n_active
        gamma = np.matmul(z[:, None, :m], Linv[:, :m, :m])[:, 0]
        code.scatter_add_(1, idx_t[:, :m], torch.from_numpy(gamma))
