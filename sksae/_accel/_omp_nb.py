"""The OMP of :mod:`sksae.coders._omp`, compiled per row with numba.

Same steps, stopping rules and arithmetic dtype (the Gram matrix's) as
:func:`sksae.coders._omp._omp_block`: inverse Cholesky factor ``L^{-1}`` of
the active Gram block, ``z = L^{-1} c_A``, and the residual correlations
updated by a weighted sum of Gram rows per step. Each row runs all its steps
in one compiled loop, without the per-step dispatch of the batched path. This
is the CPU's OMP coder.

Imports numba at import time; :mod:`.compiled` imports this module on a
coder's first request for the kernel.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["omp_rows"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def omp_rows(C, G, k, consts, out):
    """OMP codes of every row of ``C`` with at most ``k`` atoms; writes into ``out``.

    Parameters
    ----------
    C : ndarray of shape (n, K), C-contiguous
        Correlations ``D x`` of each row with the atoms, in G's dtype.
    G : ndarray of shape (K, K), C-contiguous
        Gram matrix of the atoms.
    k : int
        Most atoms per row.
    consts : ndarray of shape (3,), G's dtype
        ``eps, 1, 0`` in G's dtype (keeps float32 arithmetic in float32: numba
        promotes mixed float32/float64 to float64).
    out : ndarray of shape (n, K), G's dtype
        Zeros on entry; the codes on exit.
    """
    n, K = C.shape
    eps, one, zero = consts[0], consts[1], consts[2]
    dt = C.dtype
    R = np.empty(K, dtype=dt)
    v = np.empty(K, dtype=dt)
    Linv = np.zeros((k, k), dtype=dt)
    z = np.zeros(k, dtype=dt)
    wts = np.zeros(k, dtype=dt)
    idx = np.zeros(k, dtype=np.int64)
    lv = np.zeros(k, dtype=dt)
    y = np.zeros(k, dtype=dt)
    for i in range(n):
        for j in range(K):
            R[j] = C[i, j]
        m = 0
        for s in range(k):
            # The atom most correlated with the residual (first index of the
            # largest |R|, as _ops.argmax_abs).
            lam = 0
            best = abs(R[0])
            for j in range(1, K):
                aj = abs(R[j])
                if aj > best:
                    best, lam = aj, j
            picked = R[lam]
            # The row stops where scikit-learn stops it: a residual correlation
            # below machine epsilon, an atom picked twice, a dependent atom.
            if picked * picked < eps:
                break
            c_new = C[i, lam]
            if s > 0:
                again = False
                for t in range(s):
                    if idx[t] == lam:
                        again = True
                if again:
                    break
                # l = L^{-1} G[A, lam] (L^{-1} lower triangular), y = L^{-T} l.
                lkk = G[lam, lam]
                for t in range(s):
                    acc = zero
                    for q in range(t + 1):
                        acc += Linv[t, q] * G[idx[q], lam]
                    lv[t] = acc
                    lkk -= acc * acc
                if lkk <= eps:
                    break
                for t in range(s):
                    acc = zero
                    for q in range(t, s):
                        acc += lv[q] * Linv[q, t]
                    y[t] = acc
                    c_new -= lv[t] * z[t]
            else:
                lkk = G[lam, lam]
            inv = one / np.sqrt(lkk if lkk > eps else eps)
            # New row of L^{-1}: [-y / l_kk, 1 / l_kk]; it weighs the Gram rows of
            # the correlation drop.
            idx[s] = lam
            wts[s] = inv
            Linv[s, s] = inv
            for t in range(s):
                wts[t] = y[t] * -inv
                Linv[s, t] = wts[t]
            zs = c_new * inv
            z[s] = zs
            for j in range(K):
                v[j] = zero
            for t in range(s + 1):
                wt = wts[t] * zs
                row = idx[t]
                for j in range(K):
                    v[j] += G[row, j] * wt
            for j in range(K):
                R[j] -= v[j]
            m = s + 1
        # Coefficients L^{-T} z.
        for t in range(m):
            acc = zero
            for q in range(t, m):
                acc += z[q] * Linv[q, t]
            out[i, idx[t]] += acc
        for t in range(m):
            for q in range(t + 1):
                Linv[t, q] = zero
    return 0
