"""Orthogonal matching pursuit batched over rows, with Cholesky updates on the Gram.

The algorithm is scikit-learn's ``orthogonal_mp_gram`` (Rubinstein, Zibulevsky &
Elad 2008, "Efficient implementation of the K-SVD algorithm using batch
orthogonal matching pursuit"), run for every row at once: each step picks the
atom most correlated with the residual, appends one row to a per-sample
Cholesky factor of the active Gram block and re-solves the least squares.
A row stops exactly where scikit-learn stops it (an atom picked twice, a
correlation below machine epsilon, or a numerically dependent atom).
"""

from __future__ import annotations

import torch

__all__ = ["omp"]


# Rows per block: the per-row projected Gram columns V (k, K) stay within this.
_BLOCK_BYTES = 32 * 2**20


def omp(X, D, *, gram=None, cov=None, n_nonzero_coefs=1, **_):
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

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        Always True (a fixed number of greedy steps).
    """
    n, K = X.shape[0], D.shape[0]
    G = D @ D.T if gram is None else gram
    C = X @ D.T if cov is None else cov
    k = int(n_nonzero_coefs)
    code = torch.zeros(n, K, dtype=G.dtype, device=X.device)
    if n == 0 or k == 0 or K == 0:
        return code, True
    block = max(1, _BLOCK_BYTES // max(1, k * K * G.element_size()))
    for s in range(0, n, block):
        code[s:s + block] = _omp_block(C[s:s + block], G, k)
    return code, True


def _omp_block(C, G, k):
    """OMP on one block of rows, by projected Gram columns (no LAPACK in the loop).

    With ``L`` the Cholesky factor of the active Gram block ``G_AA``, keep per
    row ``V = L^{-1} G[A, :]`` (one row per active atom) and ``z = L^{-1} c_A``.
    Then the residual correlations are ``c - V^T z``, and adding atom ``j``
    appends ``l = V[:, j]`` to ``L`` (``l_kk^2 = G_jj - |l|^2``), the row
    ``(G[j] - l^T V) / l_kk`` to ``V`` and ``(c_j - l . z) / l_kk`` to ``z``:
    the correlations drop by that row times that entry (rank one, O(|A| K)
    per row instead of a K x K product). The coefficients are
    ``L^{-T} z``, one triangular solve at the end.
    """
    n, K = C.shape
    dt, dev = G.dtype, C.device
    eps = torch.finfo(dt).eps
    rows = torch.arange(n, device=dev)
    V = torch.zeros(n, k, K, dtype=dt, device=dev)
    L = torch.zeros(n, k, k, dtype=dt, device=dev)
    z = torch.zeros(n, k, dtype=dt, device=dev)
    idx = torch.zeros(n, k, dtype=torch.long, device=dev)
    live = torch.ones(n, dtype=torch.bool, device=dev)
    gdiag = G.diagonal()
    resid_corr = C.clone()
    n_active = 0
    for s in range(k):
        lam = resid_corr.abs().argmax(dim=1)
        picked = resid_corr[rows, lam]
        stop = picked.square() < eps
        if s > 0:
            stop |= (idx[:, :s] == lam[:, None]).any(dim=1)
            w = V[rows, :s, lam]  # L^{-1} G[A, lam]
            lkk = gdiag[lam] - w.square().sum(dim=1)
            stop |= lkk <= eps
        else:
            w = None
            lkk = gdiag[lam]
        live = live & ~stop
        if not bool(live.any()):
            break
        lk = lkk.clamp(min=eps).sqrt()
        inv = torch.where(live, 1.0 / lk, 0.0)
        g = G[lam]
        c_new = C[rows, lam]
        if w is not None:
            w = torch.where(live[:, None], w, 0.0)
            g = torch.baddbmm(g.unsqueeze(1), w.unsqueeze(1), V[:, :s], alpha=-1.0).squeeze(1)
            c_new = c_new - (w * z[:, :s]).sum(dim=1)
            L[:, s, :s] = w
        v = g.mul_(inv[:, None])
        V[:, s] = v
        zs = c_new * inv
        z[:, s] = zs
        # Rows that stopped get a unit diagonal and z = 0: a zero coefficient.
        L[:, s, s] = torch.where(live, lk, 1.0)
        idx[:, s] = torch.where(live, lam, idx[:, s - 1] if s > 0 else lam)
        resid_corr.addcmul_(v, zs[:, None], value=-1.0)
        n_active = s + 1
    code = torch.zeros(n, K, dtype=dt, device=dev)
    if n_active:
        Lm = L[:, :n_active, :n_active]
        gamma = torch.linalg.solve_triangular(Lm.transpose(1, 2), z[:, :n_active].unsqueeze(-1),
                                              upper=True).squeeze(-1)
        code.scatter_add_(1, idx[:, :n_active], gamma)
    return code
