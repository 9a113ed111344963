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
    eps = torch.finfo(G.dtype).eps
    rows = torch.arange(n, device=X.device)
    L = torch.zeros(n, k, k, dtype=G.dtype, device=X.device)
    idx = torch.zeros(n, k, dtype=torch.long, device=X.device)
    gamma = torch.zeros(n, k, dtype=G.dtype, device=X.device)
    live = torch.ones(n, dtype=torch.bool, device=X.device)
    resid_corr = C
    for s in range(k):
        lam = resid_corr.abs().argmax(dim=1)
        picked = resid_corr[rows, lam]
        stop = picked.square() < eps
        if s > 0:
            stop |= (idx[:, :s] == lam[:, None]).any(dim=1)
            g_new = G[idx[:, :s], lam[:, None]]  # (n, s): Gram of the new atom with the active ones
            w = torch.linalg.solve_triangular(L[:, :s, :s], g_new.unsqueeze(-1), upper=False)
            w = w.squeeze(-1)
            lkk = G[lam, lam] - w.square().sum(dim=1)
            stop |= lkk <= eps
        else:
            w = None
            lkk = G[lam, lam]
        live = live & ~stop
        if not bool(live.any()):
            break
        # Rows that stopped keep their factor; give them a harmless diagonal so
        # the batched triangular solves stay finite.
        if w is not None:
            L[:, s, :s] = torch.where(live[:, None], w, torch.zeros_like(w))
        L[:, s, s] = torch.where(live, lkk.clamp(min=eps).sqrt(), torch.ones_like(lkk))
        idx[:, s] = torch.where(live, lam, idx[:, s - 1] if s > 0 else lam)
        active_c = C.gather(1, idx[:, : s + 1]).unsqueeze(-1)
        sol = torch.cholesky_solve(active_c, L[:, : s + 1, : s + 1]).squeeze(-1)
        gamma[:, : s + 1] = torch.where(live[:, None], sol, gamma[:, : s + 1])
        # Correlations of the residual: c - gamma G[active], as one dense matmul
        # (a gather of the active Gram rows per step costs more than the GEMM).
        dense = torch.zeros(n, K, dtype=G.dtype, device=X.device)
        dense.scatter_add_(1, idx[:, : s + 1], gamma[:, : s + 1])
        resid_corr = torch.addmm(C, dense, G, alpha=-1.0)
        n_active = s + 1
    else:
        n_active = k
    code = torch.zeros(n, K, dtype=G.dtype, device=X.device)
    if k > 0 and n_active > 0:
        # Stopped rows carry zeros in gamma beyond their own support.
        code.scatter_add_(1, idx[:, :n_active], gamma[:, :n_active])
    return code, True
