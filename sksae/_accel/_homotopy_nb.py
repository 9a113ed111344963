"""The LARS-lasso homotopy of :mod:`sksae.coders._homotopy`, compiled per row with numba.

Same state, same events, same final solve as the batched torch path, but each
row runs its whole path inside one compiled loop: a path step of a 100-atom
row is a few hundred flops, which the dispatch of the ~60 calls of a batched
step would cost many times over. One call codes a whole block of rows. This is
the CPU's lasso coder (:func:`sksae.coders._lasso_lars.lasso_lars`).

This module imports numba at import time; :mod:`.compiled` imports it on a
coder's first request for the kernel.

Precision follows :mod:`._homotopy`: the scan over all atoms (correlations
``r``, rates ``a``, entering steps) runs in the input's dtype, the
active-set algebra (inverse Gram block ``H``, coefficients ``u``, ``lambda``,
steps) in float64.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["homotopy_rows"]

# Slots of the per-row inverse Gram block allocated at first; doubled (up to
# the number of atoms) when a row's active set outgrows them.
_CAP0 = 32


@numba.njit(cache=True, nogil=True)
def _grow(H, idx, sg, u, g, y, x, b, cap):
    """Copies of the slot arrays with ``cap`` slots (the active ones kept)."""
    old = idx.shape[0]
    H2 = np.zeros((cap, cap))
    H2[:old, :old] = H
    idx2 = np.zeros(cap, dtype=np.int64)
    idx2[:old] = idx
    sg2 = np.zeros(cap)
    sg2[:old] = sg
    u2 = np.zeros(cap)
    u2[:old] = u
    return H2, idx2, sg2, u2, np.zeros(cap), np.zeros(cap), np.zeros(cap), np.zeros(cap)


# error_model="numpy": divisions by zero give the +inf steps the path relies
# on (as numpy's with errstate(divide="ignore")), not ZeroDivisionError.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def homotopy_rows(C, G, Gs, alpha, positive, max_iter, usable, refine, consts, out):
    """Lasso codes of every row of ``C`` by its LARS-lasso path; writes into ``out``.

    Parameters
    ----------
    C : ndarray of shape (n, K), float32 or float64, C-contiguous
        Correlations ``D x`` of each row with the atoms (the scan dtype).
    G : ndarray of shape (K, K), float64
        Gram matrix of the atoms (active-set algebra).
    Gs : ndarray of shape (K, K), C's dtype
        The same Gram matrix in the scan dtype (the rates ``a``).
    alpha : float
        Penalty at which each path stops.
    positive : bool
        Only positive coefficients (atoms enter with sign +1).
    max_iter : int
        Path steps (events) per row after the first atom entered.
    usable : ndarray of shape (K,), bool
        Atoms allowed to enter.
    refine : bool
        One refinement step with the Gram block in the final solve (float64
        data: removes the drift of ``H`` along the path).
    consts : ndarray of shape (3,), C's dtype
        ``tiny, 1, 0`` in the scan dtype, so that the scan's arithmetic stays
        in that dtype (numba promotes mixed float32/float64 to float64).
    out : ndarray of shape (n, K), float64
        Zeros on entry; the codes on exit.

    Returns
    -------
    n_unconverged : int
        Rows that had not reached ``alpha`` after ``max_iter`` steps (their code
        is the exact solution on the support reached, at the ``lambda`` reached).
    """
    n, K = C.shape
    tiny_s, one_s, zero_s = consts[0], consts[1], consts[2]
    sbuf = consts.copy()  # stores a float64 into the scan dtype
    sbuf[0] = np.inf
    inf_s = sbuf[0]
    gdiag = np.empty(K)
    for k in range(K):
        gdiag[k] = G[k, k]
    r = np.empty(K, dtype=C.dtype)
    a = np.empty(K, dtype=C.dtype)
    ws = np.empty(K, dtype=C.dtype)
    dk = np.empty(K, dtype=C.dtype)
    # 0 for candidates, +inf for atoms that may not enter (active, unusable,
    # dropped as dependent).
    pen = np.empty(K, dtype=C.dtype)
    cap = min(K, _CAP0)
    H = np.zeros((cap, cap))
    idx = np.zeros(cap, dtype=np.int64)
    sg = np.zeros(cap)
    u = np.zeros(cap)
    g = np.zeros(cap)
    y = np.zeros(cap)
    w = np.zeros(cap)
    b = np.zeros(cap)
    n_unconverged = 0
    for i in range(n):
        # The first atom: the largest (positive) correlation among usable atoms.
        j0 = 0
        best = -1.0
        for k in range(K):
            c = C[i, k]
            s = (c if c > 0 else 0.0) if positive else abs(c)
            if not usable[k]:
                s = -1.0
            if k == 0 or s > best:
                best, j0 = s, k
        lam = float(best)
        if not lam > alpha:
            continue  # zero code
        for k in range(K):
            r[k] = C[i, k]
            pen[k] = zero_s if usable[k] else inf_s
        n_act = 0
        blocked = -1
        finished = False
        j_new = j0
        for it in range(max_iter + 1):
            if j_new >= 0:
                # Atom j_new enters: rank-one update of H (the inverse active Gram).
                j = j_new
                j_new = -1
                if n_act == cap:
                    cap = min(K, 2 * cap)
                    H, idx, sg, u, g, y, w, b = _grow(H, idx, sg, u, g, y, w, b, cap)
                for s in range(n_act):
                    g[s] = G[idx[s], j]
                lkk2 = gdiag[j]
                for t in range(n_act):
                    acc = 0.0
                    for s in range(n_act):
                        acc += g[s] * H[s, t]
                    y[t] = acc
                    lkk2 -= g[t] * acc
                pen[j] = inf_s
                # A (numerically) dependent atom is dropped for good, as lars_path does.
                if lkk2 > 1e-9 * gdiag[j]:
                    inv = 1.0 / lkk2
                    for s in range(n_act):
                        ys = y[s] * inv
                        for t in range(n_act):
                            H[s, t] += ys * y[t]
                        H[n_act, s] = -ys
                        H[s, n_act] = -ys
                    H[n_act, n_act] = inv
                    if positive:
                        sg[n_act] = 1.0
                    else:
                        rj = r[j]
                        sg[n_act] = 1.0 if rj > 0 else (-1.0 if rj < 0 else 0.0)
                    idx[n_act] = j
                    u[n_act] = 0.0
                    n_act += 1
            if it == max_iter:
                break
            # Direction w = H s and rates a = G[:, A] w (scan dtype).
            for s in range(n_act):
                acc = 0.0
                for t in range(n_act):
                    acc += H[s, t] * sg[t]
                w[s] = acc
                sbuf[0] = acc
                ws[s] = sbuf[0]
            for k in range(K):
                a[k] = zero_s
            for s in range(n_act):
                wss = ws[s]
                row = idx[s]
                for k in range(K):
                    a[k] += Gs[row, k] * wss
            # Entering step of each candidate (see _homotopy for the formula),
            # branch-free so that the loop vectorises; excluded atoms (and the
            # one that just left) get +inf through pen.
            sbuf[0] = lam
            lam_s = sbuf[0]
            if blocked >= 0:
                pen[blocked] = inf_s
            if positive:
                for k in range(K):
                    num = lam_s - r[k]
                    den = one_s - a[k]
                    num = num if num > tiny_s else tiny_s
                    den = den if den > zero_s else zero_s
                    dk[k] = num / den + pen[k]
            else:
                for k in range(K):
                    rk, ak = r[k], a[k]
                    t_ = rk - ak * lam_s
                    sgn = (one_s if t_ > zero_s else zero_s) - (one_s if t_ < zero_s else zero_s)
                    num = lam_s - sgn * rk
                    den = one_s - sgn * ak
                    num = num if num > tiny_s else tiny_s
                    den = den if den > zero_s else zero_s
                    dk[k] = num / den + pen[k]
            if blocked >= 0:
                pen[blocked] = zero_s
            j_in = 0
            din = dk[0]
            for k in range(1, K):
                if dk[k] < din:
                    din, j_in = dk[k], k
            din = float(din)
            # An atom that just left may not re-enter at the very next event.
            blocked = -1
            # Leaving: an active coefficient crossing zero, at -u / w > 0.
            dout = np.inf
            i_out = -1
            for s in range(n_act):
                ratio = -u[s] / w[s]
                if ratio > 0 and ratio < dout:
                    dout, i_out = ratio, s
            # The first event; ties go to finishing, then to an atom entering.
            dfin = lam - alpha
            if dfin <= din and dfin <= dout:
                kind, step = 0, dfin
            elif din <= dout:
                kind, step = 1, din
            else:
                kind, step = 2, dout
            for s in range(n_act):
                u[s] += step * w[s]
            lam = lam - step
            if kind == 0:
                finished = True
                break
            sbuf[0] = step
            step_s = sbuf[0]
            for k in range(K):
                r[k] -= step_s * a[k]
            if kind == 1:
                j_new = j_in
            else:
                # Slot q leaves: downdate H, move the last slot into q.
                q = i_out
                u[q] = 0.0
                last = n_act - 1
                hqq = H[q, q]
                for s in range(n_act):
                    g[s] = H[q, s]
                for s in range(n_act):
                    hs = g[s] / hqq
                    for t in range(n_act):
                        H[t, s] -= g[t] * hs
                for t in range(n_act):
                    H[q, t] = H[last, t]
                for t in range(n_act):
                    H[t, q] = H[t, last]
                for t in range(n_act):
                    H[last, t] = 0.0
                    H[t, last] = 0.0
                atom = idx[q]
                idx[q] = idx[last]
                sg[q] = sg[last]
                u[q] = u[last]
                sg[last] = 0.0
                u[last] = 0.0
                pen[atom] = zero_s
                blocked = atom
                n_act = last
        if not finished:
            n_unconverged += 1
        # Exact codes on the final support: G_AA^{-1} (c_A - lam s_A) by H.
        for s in range(n_act):
            b[s] = (float(C[i, idx[s]]) - lam * sg[s]) if sg[s] != 0 else 0.0
        for s in range(n_act):
            acc = 0.0
            for t in range(n_act):
                acc += H[s, t] * b[t]
            y[s] = acc
        if refine:
            # One refinement step with the Gram block: the drift of H (~1e-10
            # relative on ill-conditioned atoms) is below float32's resolution,
            # not below float64's.
            for s in range(n_act):
                acc = 0.0
                if sg[s] != 0:
                    for t in range(n_act):
                        if sg[t] != 0:
                            acc += G[idx[s], idx[t]] * y[t]
                g[s] = b[s] - acc
            for s in range(n_act):
                acc = 0.0
                for t in range(n_act):
                    acc += H[s, t] * g[t]
                y[s] += acc
        # A row where the exact point flips a sign (degenerate) keeps its path point.
        good = True
        for s in range(n_act):
            if not np.isfinite(y[s]) or (sg[s] != 0 and not y[s] * sg[s] > 0):
                good = False
        for s in range(n_act):
            out[i, idx[s]] += y[s] if good else u[s]
        # Slots past the active set are kept zero along the path: clearing the
        # active block readies the state for the next row.
        for s in range(n_act):
            sg[s] = 0.0
            u[s] = 0.0
            for t in range(n_act):
                H[s, t] = 0.0
    return n_unconverged
