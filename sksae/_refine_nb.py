"""Non-negative OMP compiled per row with numba, for :mod:`sksae._refine`.

The per-row loop of :mod:`sksae._accel._omp_nb` (inverse Cholesky factor of the
active Gram block, residual correlations updated by weighted Gram rows) with
three changes: the atom picked is the one with the largest *positive*
correlation, a row stops once the explained energy ``||z||^2`` reaches
``target[i]``, and the codes are written as (index, value) pairs, ``k`` per row,
instead of a dense ``(n, K)`` array. Imports numba at import time.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["nnomp_rows"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def nnomp_rows(C, G, k, target, idx_out, val_out):
    """Codes of every row of ``C`` (correlations ``X D^T``) into idx_out/val_out."""
    n, K = C.shape
    eps = np.float32(1e-7)
    R = np.empty(K, dtype=np.float32)
    v = np.empty(K, dtype=np.float32)
    Linv = np.zeros((k, k), dtype=np.float32)
    z = np.zeros(k, dtype=np.float32)
    wts = np.zeros(k, dtype=np.float32)
    idx = np.zeros(k, dtype=np.int64)
    lv = np.zeros(k, dtype=np.float32)
    y = np.zeros(k, dtype=np.float32)
    for i in range(n):
        for j in range(K):
            R[j] = C[i, j]
        m = 0
        energy = np.float32(0.0)
        for s in range(k):
            lam = 0
            best = R[0]
            for j in range(1, K):
                if R[j] > best:
                    best, lam = R[j], j
            if best <= eps:
                break
            again = False
            for t in range(s):
                if idx[t] == lam:
                    again = True
            if again:
                break
            c_new = C[i, lam]
            lkk = G[lam, lam]
            for t in range(s):
                acc = np.float32(0.0)
                for q in range(t + 1):
                    acc += Linv[t, q] * G[idx[q], lam]
                lv[t] = acc
                lkk -= acc * acc
            if lkk <= eps:
                break
            for t in range(s):
                acc = np.float32(0.0)
                for q in range(t, s):
                    acc += lv[q] * Linv[q, t]
                y[t] = acc
                c_new -= lv[t] * z[t]
            inv = np.float32(1.0) / np.sqrt(lkk)
            idx[s] = lam
            wts[s] = inv
            Linv[s, s] = inv
            for t in range(s):
                wts[t] = y[t] * -inv
                Linv[s, t] = wts[t]
            zs = c_new * inv
            z[s] = zs
            m = s + 1
            energy += zs * zs
            if energy >= target[i] or s + 1 == k:
                break
            for j in range(K):
                v[j] = 0.0
            for t in range(s + 1):
                wt = wts[t] * zs
                row = idx[t]
                for j in range(K):
                    v[j] += G[row, j] * wt
            for j in range(K):
                R[j] -= v[j]
        for t in range(k):
            idx_out[i, t] = 0
            val_out[i, t] = 0.0
        for t in range(m):
            acc = np.float32(0.0)
            for q in range(t, m):
                acc += z[q] * Linv[q, t]
            idx_out[i, t] = idx[t]
            val_out[i, t] = acc if acc > 0 else np.float32(0.0)
        for t in range(m):
            for q in range(t + 1):
                Linv[t, q] = 0.0
    return 0
