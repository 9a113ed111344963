"""Orthogonal matching pursuit batched over rows, with Cholesky updates on the Gram.

The algorithm is scikit-learn's ``orthogonal_mp_gram`` (Rubinstein, Zibulevsky &
Elad 2008, "Efficient implementation of the K-SVD algorithm using batch
orthogonal matching pursuit"), run for every row at once: each step picks the
atom most correlated with the residual, appends one row to a per-sample
Cholesky factor of the active Gram block and re-solves the least squares.
A row stops exactly where scikit-learn stops it (an atom picked twice, a
correlation below machine epsilon, or a numerically dependent atom).

Two implementations of the same steps: on the CPU each row compiled with numba
(:mod:`sksae._accel._omp_nb`), on other devices batched over rows in torch
(:func:`_omp_block`), which also runs on the CPU when the compiled kernel cannot
be loaded (a broken numba install).
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.compiled import kernel as compiled_kernel
from .._accel.ops import argmax_abs, coder_engine

__all__ = ["omp"]


# Rows per block: the (rows, n_components) correlations stay cache-sized.
_BLOCK_BYTES = 8 * 2**20
# Gram columns per panel: the weighted sums of Gram rows read one panel of at most
# 128 columns (512 KiB in float32) at a time, which stays in a core's L2 cache;
# the whole Gram matrix (4 MiB for 1024 atoms) does not, and would be streamed
# from L3 at every step.
_PANEL = 128


def omp(X, D, *, gram=None, cov=None, n_nonzero_coefs=1, engine=None, **_):
    """Greedy sparse codes with at most ``n_nonzero_coefs`` atoms per row.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    D : Tensor of shape (n_components, n_features)
    gram : Tensor of shape (n_components, n_components), default=None
        Precomputed ``D @ D.T``.
    cov : Tensor of shape (n_samples, n_components), default=None
        Precomputed ``X @ D.T``.
    n_nonzero_coefs : int, default=1
    engine : {"torch", "numba"}, default=None
        None picks, for CPU tensors, the numba-compiled per-row loop
        (:mod:`sksae._accel._omp_nb`; torch when it cannot be loaded), and
        torch on other devices. ``"numba"`` takes CPU tensors only.

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        Always True (a fixed number of greedy steps).
    """
    engine = coder_engine(engine, X.device, "omp")
    n, K = X.shape[0], D.shape[0]
    G = D @ D.T if gram is None else gram
    C = X @ D.T if cov is None else cov
    k = int(n_nonzero_coefs)
    code = torch.zeros(n, K, dtype=G.dtype, device=X.device)
    if n == 0 or k == 0 or K == 0:
        return code, True
    if engine == "numba":
        kernel = compiled_kernel("omp", required=True)
        Gn = np.ascontiguousarray(G.detach().numpy())
        # Per row the working set is two K-vectors and k x k factors: no blocking.
        Cn = np.ascontiguousarray(C.detach().to(G.dtype).numpy())
        consts = np.array([np.finfo(Gn.dtype).eps, 1.0, 0.0], dtype=Gn.dtype)
        kernel(Cn, Gn, k, consts, code.numpy())
        return code, True
    panels = [(lo, G[:, lo:lo + _PANEL].contiguous()) for lo in range(0, K, _PANEL)]
    block = max(1, _BLOCK_BYTES // max(1, K * G.element_size()))
    for s in range(0, n, block):
        _omp_block(C[s:s + block], G, k, panels, code[s:s + block])
    return code, True


def _omp_block(C, G, k, panels, code):
    """OMP on one block of rows with inverse Cholesky factors (no LAPACK in the loop).

    With ``L`` the Cholesky factor of the active Gram block ``G_AA``, keep per
    row ``L^{-1}`` and ``z = L^{-1} c_A``. The residual correlations are
    ``c - G[:, A] L^{-T} z``; adding atom ``j`` appends ``l = L^{-1} G[A, j]``
    to ``L`` (``l_kk^2 = G_jj - |l|^2``), the row ``[-y / l_kk, 1 / l_kk]`` to
    ``L^{-1}`` (``y = L^{-T} l``) and ``(c_j - l . z) / l_kk`` to ``z``, and the
    correlations drop by ``(G[j] - y^T G[A, :]) / l_kk`` times that entry: a
    weighted sum of rows of the shared Gram matrix per sample (one
    ``embedding_bag``, O(|A| K) per row read from the cached Gram matrix, no
    per-row copy of Gram rows). The coefficients are ``L^{-T} z``.
    """
    n, K = C.shape
    dt, dev = G.dtype, C.device
    eps = torch.finfo(dt).eps
    Linv = torch.zeros(n, k, k, dtype=dt, device=dev)
    # Its transpose too: both products with it are then row-vector times matrix,
    # which batched GEMM runs faster than matrix times column.
    LinvT = torch.zeros(n, k, k, dtype=dt, device=dev)
    z = torch.zeros(n, k, dtype=dt, device=dev)
    # Slot s holds the atom picked at step s; weights[:, s] its coefficient in the
    # next correlation drop (the last slot is the new atom itself).
    idx = torch.zeros(n, k, dtype=torch.long, device=dev)
    weights = torch.zeros(n, k, dtype=dt, device=dev)
    live = torch.ones(n, dtype=torch.bool, device=dev)
    gdiag = G.diagonal()
    Gflat = G.reshape(-1)
    resid_corr = C.clone()
    n_active = 0
    for s in range(k):
        lam = argmax_abs(resid_corr).to(dev)
        picked = resid_corr.gather(1, lam[:, None]).squeeze(1)
        c_new = C.gather(1, lam[:, None]).squeeze(1)
        stop = picked.square() < eps
        if s > 0:
            stop |= (idx[:, :s] == lam[:, None]).any(dim=1)
            # l = L^{-1} G[A, lam], y = L^{-T} l
            g = Gflat.take(idx[:, :s] * K + lam[:, None])
            l = torch.bmm(g.unsqueeze(1), LinvT[:, :s, :s]).squeeze(1)
            lkk = gdiag[lam] - l.square().sum(dim=1)
            stop |= lkk <= eps
            y = torch.bmm(l.unsqueeze(1), Linv[:, :s, :s]).squeeze(1)
            c_new = c_new - (l * z[:, :s]).sum(dim=1)
        else:
            lkk = gdiag[lam]
        live &= ~stop
        if not bool(live.any()):
            break
        # Rows that stopped get zero weights: no correlation change, zero coefficient.
        inv = torch.where(live, lkk.clamp(min=eps).rsqrt(), 0.0)
        idx[:, s] = lam
        weights[:, s] = inv
        Linv[:, s, s] = inv
        LinvT[:, s, s] = inv
        if s > 0:
            weights[:, :s] = y * -inv[:, None]
            Linv[:, s, :s] = weights[:, :s]
            LinvT[:, :s, s] = weights[:, :s]
        zs = c_new * inv
        z[:, s] = zs
        ii, ww, zz = idx[:, :s + 1], weights[:, :s + 1], zs[:, None]
        for lo, panel in panels:
            v = torch.nn.functional.embedding_bag(ii, panel, per_sample_weights=ww, mode="sum")
            resid_corr[:, lo:lo + panel.shape[1]].addcmul_(v, zz, value=-1.0)
        n_active = s + 1
    if n_active:
        m = n_active
        gamma = torch.bmm(z[:, None, :m], Linv[:, :m, :m]).squeeze(1)
        code.scatter_add_(1, idx[:, :m], gamma)
