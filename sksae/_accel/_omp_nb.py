"""The OMP of :mod:`sksae.coders._omp`, compiled per row with numba.

Same steps, stopping rules and arithmetic dtype (the Gram matrix's) as
:func:`sksae.coders._omp._omp_block`: inverse Cholesky factor ``L^{-1}`` of
the active Gram block, ``z = L^{-1} c_A``, and the residual correlations
updated by a weighted sum of Gram rows per step. Each row runs all its steps
in one compiled loop, without the per-step dispatch of the batched path.

One row loop (:func:`_omp_row`) serves two kernels:

- :func:`omp_rows`, the CPU's OMP coder (scikit-learn's OMP: the atom of
  largest ``|correlation|``, codes written into a dense array);
- :func:`nnomp_rows`, the non-negative OMP of :mod:`sksae._refine`: the atom of
  largest *positive* correlation, a row stops once the explained energy
  ``||z||^2`` reaches ``target[i, 0]`` or before an atom that would add less
  than ``target[i, 1]`` to it, coefficients clipped at 0, and the codes
  written as (index, value) pairs, ``k`` per row.

Imports numba at import time; :mod:`.compiled` imports this module on the
first request for one of its kernels.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["omp_rows", "nnomp_rows"]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _omp_row(C, i, G, k, consts, nonneg, target, R, v, Linv, z, wts, idx, lv, y):
    """Greedy steps of row ``i``; returns the number of atoms ``m`` in ``idx[:m]``.

    On return ``Linv[:m, :m]`` and ``z[:m]`` hold the factors whose product
    ``L^{-T} z`` is the row's coefficients (see :func:`_coefficient`).
    """
    K = C.shape[1]
    eps, one, zero = consts[0], consts[1], consts[2]
    for j in range(K):
        R[j] = C[i, j]
    m = 0
    energy = zero
    for s in range(k):
        lam = 0
        if nonneg:
            # The atom that most reduces the residual with a positive coefficient.
            best = R[0]
            for j in range(1, K):
                if R[j] > best:
                    best, lam = R[j], j
            if best <= eps:
                break
        else:
            # The atom most correlated with the residual (first index of the
            # largest |R|, as _ops.argmax_abs).
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
        zs = c_new * inv  # the atom explains zs^2 more of the row's energy
        if nonneg and zs * zs < target[i, 1]:
            break
        # New row of L^{-1}: [-y / l_kk, 1 / l_kk]; it weighs the Gram rows of
        # the correlation drop.
        idx[s] = lam
        wts[s] = inv
        Linv[s, s] = inv
        for t in range(s):
            wts[t] = y[t] * -inv
            Linv[s, t] = wts[t]
        z[s] = zs
        m = s + 1
        energy += zs * zs
        if m == k or (nonneg and energy >= target[i, 0]):
            break  # the residual correlations are not needed any more
        for j in range(K):
            v[j] = zero
        for t in range(s + 1):
            wt = wts[t] * zs
            row = idx[t]
            for j in range(K):
                v[j] += G[row, j] * wt
        for j in range(K):
            R[j] -= v[j]
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _coefficient(Linv, z, m, t, zero):
    """Coefficient ``t`` of ``L^{-T} z`` over the first ``m`` atoms."""
    acc = zero
    for q in range(t, m):
        acc += z[q] * Linv[q, t]
    return acc


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _clear(Linv, m, zero):
    for t in range(m):
        for q in range(t + 1):
            Linv[t, q] = zero


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
    dt = C.dtype
    R, v = np.empty(K, dtype=dt), np.empty(K, dtype=dt)
    Linv = np.zeros((k, k), dtype=dt)
    z, wts, lv, y = (np.zeros(k, dtype=dt), np.zeros(k, dtype=dt), np.zeros(k, dtype=dt),
                     np.zeros(k, dtype=dt))
    idx = np.zeros(k, dtype=np.int64)
    target = np.zeros((1, 2), dtype=dt)
    for i in range(n):
        m = _omp_row(C, i, G, k, consts, False, target, R, v, Linv, z, wts, idx, lv, y)
        for t in range(m):
            out[i, idx[t]] += _coefficient(Linv, z, m, t, consts[2])
        _clear(Linv, m, consts[2])
    return 0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def nnomp_rows(C, G, k, consts, target, idx_out, val_out):
    """Non-negative OMP codes of every row of ``C`` as (index, value) pairs.

    Parameters
    ----------
    C, G, k, consts
        As :func:`omp_rows`.
    target : ndarray of shape (n, 2), G's dtype
        A row stops once its explained energy reaches ``target[i, 0]``, or
        before an atom that would explain less than ``target[i, 1]`` more.
    idx_out : ndarray of shape (n, k), int64
    val_out : ndarray of shape (n, k), G's dtype
        The atoms and coefficients of each row; unused slots hold (0, 0).
    """
    n, K = C.shape
    dt = C.dtype
    zero = consts[2]
    R, v = np.empty(K, dtype=dt), np.empty(K, dtype=dt)
    Linv = np.zeros((k, k), dtype=dt)
    z, wts, lv, y = (np.zeros(k, dtype=dt), np.zeros(k, dtype=dt), np.zeros(k, dtype=dt),
                     np.zeros(k, dtype=dt))
    idx = np.zeros(k, dtype=np.int64)
    for i in range(n):
        m = _omp_row(C, i, G, k, consts, True, target, R, v, Linv, z, wts, idx, lv, y)
        for t in range(k):
            idx_out[i, t] = 0
            val_out[i, t] = zero
        for t in range(m):
            c = _coefficient(Linv, z, m, t, zero)
            idx_out[i, t] = idx[t]
            val_out[i, t] = c if c > zero else zero
        _clear(Linv, m, zero)
    return 0
